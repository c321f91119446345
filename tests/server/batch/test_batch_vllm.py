"""The batch command on the vLLM engine (in-process, the tiny LLaVA): it starts and stops its own engine as the CLI
does, and its greedy captions at c = 0 and c = 1 (contrast pairs) equal what POST /caption answers on a vLLM server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from tests.support.batch import api_caption, batch_settings, by_key, image_folder, run_in_process  # noqa: E402
from tests.support.live_server import LiveServer, base_settings  # noqa: E402

pytestmark = pytest.mark.integration


def test_vllm_batch_equals_the_caption_api(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    settings = base_settings(tiny_model_dir("llava"), engine="vllm", max_batch_size=4, default_max_tokens=12)
    folder = image_folder(tmp_path / "pics", 6, seed0=700)
    out = tmp_path / "out.jsonl"
    # Its own engine, started and stopped by the job (one vLLM engine per process at a time).
    summary = run_in_process(batch_settings(settings, input=folder, output=out, levels="0,1"))
    got = by_key(out)
    assert len(got) == 7 * 2 and summary["failures"] == 2
    assert summary["levels"]["1.0"]["mean_telemetry"]["contrast_steps"] > 0
    live = LiveServer(settings).start(timeout=240)
    try:
        with live.client() as client:
            for path in sorted(folder.rglob("*.png")):
                name = path.relative_to(folder).as_posix()
                for level in (0.0, 1.0):
                    rec = got[(name, json.dumps(level))]
                    api = api_caption(client, path.read_bytes(), level)
                    assert rec["caption"] == api["caption"], (name, level)
                    assert rec["usage"] == api["usage"] and rec["telemetry"] == api["telemetry"], (name, level)
    finally:
        live.stop()
