"""`python -m sevi.engines.reference.generate`: the offline captioner's JSON output and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.images import random_image
from tests.support.repo import REPO

pytestmark = pytest.mark.integration


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sevi.engines.reference.generate", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_json_output_and_explicit_knobs(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    image = tmp_path / "img.png"
    random_image(4).save(image)
    contrast = tmp_path / "contrast.png"
    random_image(5).save(contrast)
    model = str(tiny_model_dir("llava"))
    proc = _run(
        "--model",
        model,
        "--image",
        str(image),
        "--preset",
        "focused",
        "--kappa",
        "0.6",
        "--contrast-image",
        str(contrast),
        "--max-tokens",
        "6",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"text", "prompt_token_ids", "token_ids", "alignment"}
    # 4 layers: Focused starts at 4/32 of the depth, rounded: layer 1.
    assert out["alignment"] == {"conservativeness": 1.0, "omega": 4.0, "start_layer": 1, "kappa": 0.6, "contrast": True}
    assert 1 <= len(out["token_ids"]) <= 6
    assert out["telemetry"]["aligned_rows"] > 0
    # The same call is deterministic (greedy; the contrast image is pinned).
    again = json.loads(
        _run(
            "--model",
            model,
            "--image",
            str(image),
            "--preset",
            "focused",
            "--kappa",
            "0.6",
            "--contrast-image",
            str(contrast),
            "--max-tokens",
            "6",
            "--json",
        ).stdout
    )
    assert again["token_ids"] == out["token_ids"]


def test_bad_knob_is_a_clear_error(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    image = tmp_path / "img.png"
    random_image(4).save(image)
    proc = _run("--model", str(tiny_model_dir("llava")), "--image", str(image), "--conservativeness", "1.5")
    assert proc.returncode == 2
    assert "conservativeness must be in [0, 1]" in proc.stderr
    missing = _run("--model", str(tiny_model_dir("llava")), "--image", str(tmp_path / "nope.png"))
    assert missing.returncode == 2 and "error:" in missing.stderr
