"""`python -m bench.chair run` against a live server: files, summary fields, and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.chair.cli import main as chair_main
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.integration


def _caption_requests(server: LiveServer) -> float:
    return server.metric("sevi_requests_total", {"endpoint": "/caption", "status": "200"})


def test_run_writes_table_plot_and_resumes(server: LiveServer, tmp_path: Path) -> None:
    args = [
        "run",
        "--server",
        server.url,
        "--split",
        "counter-prior",
        "--levels",
        "0,1",
        "--limit",
        "3",
        "--max-tokens",
        "6",
        "--contrast",
        "off",
        "--concurrency",
        "3",
        "--out",
        str(tmp_path),
    ]
    before = _caption_requests(server)
    assert chair_main(args) == 0
    assert _caption_requests(server) - before == 6  # 3 images x 2 levels
    result = json.loads((tmp_path / "counter-prior-contrast-off.json").read_text())
    assert result["n"] == 3 and set(result["levels"]) == {"0", "1"}
    for row in result["levels"].values():
        assert {"chair_s", "chair_i", "recall", "len", "partner_rate", "stage1_share", "stage2_share"} <= set(row)
        assert 0 <= row["chair_s"] <= 1 and 0 <= row["stage1_share"] <= 1
    assert result["levels"]["0"]["aligned_rows_per_caption"] == 0  # level 0 is the unmodified model
    assert result["levels"]["1"]["aligned_rows_per_caption"] > 0
    assert (tmp_path / "counter-prior-contrast-off.png").stat().st_size > 1000
    assert "| conservativeness |" in (tmp_path / "counter-prior-contrast-off.md").read_text()
    lines = (tmp_path / "captions" / "counter-prior-contrast-off-c1.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["alignment"]["contrast"] is False

    # Several results overlay on one trade-off chart.
    assert (
        chair_main(["compare", str(tmp_path / "counter-prior-contrast-off.json"), "--out", str(tmp_path / "cmp.png")])
        == 0
    )
    assert (tmp_path / "cmp.png").stat().st_size > 1000

    # A second run finds every caption on disk and sends nothing.
    middle = _caption_requests(server)
    assert chair_main(args) == 0
    assert _caption_requests(server) == middle
