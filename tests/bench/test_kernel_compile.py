"""The Triton SEVI kernels compiled for an H100 (sm_90a) without a GPU (bench/kernel_compile.py, Triton's ptxas):
no local-memory spills, A and C on tensor cores at FlashAttention's cache dtypes, and one compiled variant per
kernel however many keys decode reaches. The register / spill figures are printed (`pytest -s`, and on failure)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # this process imports triton: its kernels, if any, interpreted

from bench.kernel_compile import KERNELS, SHAPES, failures, table
from sevi.kernels import triton_available
from tests.support.repo import REPO

pytestmark = pytest.mark.skipif(triton_available() is not None, reason=f"no triton: {triton_available()}")


def _run(*args: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.kernel_compile", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode in (0, 1), done.stderr
    return done.stdout


@pytest.mark.integration
def test_kernels_compile_for_sm90a_without_spills_and_with_tensor_core_dots() -> None:
    rows = json.loads(_run("--json"))
    print("\n" + table(rows))
    assert {(r["kernel"], r["shape"]) for r in rows} == {(k, s) for k in KERNELS for s in SHAPES}
    assert failures(rows) == [], table(rows)


def test_growing_key_counts_need_one_compiled_variant_per_kernel() -> None:
    """Decode grows num_keys (and the blocks per row, and the masks' width) by one a step: with those not
    specialised on, the variant a warm-up compiles is the one every step launches."""
    keys = [1, 2, 15, 16, 17, 31, 32, 33, 64, 100, 577, 1024, 4097]
    counts = json.loads(_run("--variants", ",".join(map(str, keys))))
    assert counts == {name: 1 for name in KERNELS}
