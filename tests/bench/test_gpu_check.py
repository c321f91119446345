"""`make gpu-check`: refuses cleanly without a GPU, and its `--interpret` mode runs every section on a CPU (Triton's
interpreter, small sizes) with checks that can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the kernels run in its interpreter)

from sevi.kernels import triton_available  # noqa: E402
from tests.support.repo import REPO  # noqa: E402

SECTIONS = ("correctness", "timing", "sync_probe", "variants", "offsets", "torchvision")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_gpu_check_refuses_without_a_gpu_within_seconds() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--out", "/nonexistent/report.json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "needs an NVIDIA GPU" in done.stderr and done.stdout == ""
    assert time.monotonic() - started < 30


@pytest.mark.integration
@pytest.mark.skipif(triton_available() is not None, reason=f"no triton: {triton_available()}")
def test_interpret_mode_runs_every_section_and_every_stage_moves_heads(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--interpret", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["all_pass"] and all(report[s]["pass"] for s in SECTIONS)
    cases = report["correctness"]["cases"]
    assert {(c["model"], c["dtype"], c["layout"]) for c in cases} >= {
        ("qwen2-vl-7b", dt, lay) for dt in ("bf16", "fp16") for lay in ("NHD", "HND")
    }
    for case in cases:  # not vacuous: every group occurs and both stages moved heads, in every case
        assert min(case["counts"].values()) > 0 and case["group_mismatches"] == 0, case
    assert report["variants"]["variants"] == {"A": 1, "B": 1, "C": 1}
    assert report["offsets"]["score_offsets_ok"]
    assert len(report["timing"]["cases"]) == 4


@pytest.mark.skipif(triton_available() is not None, reason=f"no triton: {triton_available()}")
def test_a_decode_that_skips_the_alignment_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The correctness section has teeth: kernel B replaced by one that reports the operator's head groups but
    leaves the scores as they are (plain attention) fails it."""
    from bench import gpu_check
    from sevi.kernels import sevi_decode
    from sevi.method.alignment import align_prepared

    dev = torch.device("cpu")
    good = gpu_check.correctness_case("qwen2-vl-7b", "bf16", "HND", 96, gpu_check.CPU_SIZES, dev)
    assert good["pass"]

    def unaligned(scores: torch.Tensor, key_count: torch.Tensor, rows: object) -> object:
        return align_prepared(scores.clone(), rows)[1]  # type: ignore[arg-type]

    monkeypatch.setattr(sevi_decode, "align_in_place", unaligned)
    bad = gpu_check.correctness_case("qwen2-vl-7b", "bf16", "HND", 96, gpu_check.CPU_SIZES, dev)
    assert not bad["pass"] and bad["max_abs_err"]["decode"] > 0.1
