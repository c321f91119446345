"""`make gpu-check` refuses cleanly on a machine without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import REPO


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
