"""`python -m bench.chair calibrate` against a live server: requests, files, the presets it writes, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from bench.chair.cli import main as chair_main
from sevi.method.knob import PRESETS_FILE, parse_presets
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.integration


def _caption_requests(server: LiveServer) -> float:
    return server.metric("sevi_requests_total", {"endpoint": "/caption", "status": "200"})


def test_calibrate_writes_frontier_and_presets_and_resumes(server: LiveServer, tmp_path: Path) -> None:
    # The tiny random model names objects at random, so CHAIR_S is 1 everywhere on 6 images; CHAIR_I resolves.
    args = [
        "calibrate",
        "--server",
        server.url,
        "--split",
        "counter-prior",
        "in-prior",
        "--limit",
        "3",
        "--max-tokens",
        "8",
        "--omegas",
        "1,4",
        "--start-layers",
        "0,2",
        "--kappas",
        "0.5",
        "--contrast",
        "on",
        "--concurrency",
        "3",
        "--out",
        str(tmp_path),
    ]
    before = _caption_requests(server)
    assert chair_main([*args, "--metric", "chair_i"]) == 0
    # 6 images x (unmodified + contrast alone + 2 omegas x 2 start layers).
    assert _caption_requests(server) - before == 6 * 6
    result = json.loads((tmp_path / "calibrate-counter-prior+in-prior-contrast-on-chair_i.json").read_text())
    assert result["n"] == 6 and result["num_layers"] == 4 and len(result["points"]) == 6
    by_name = {p["name"]: p for p in result["points"]}
    assert set(by_name) == {"off", "w0-s0-k0.5", "w1-s0-k0.5", "w1-s2-k0.5", "w4-s0-k0.5", "w4-s2-k0.5"}
    assert by_name["off"]["aligned_rows_per_caption"] == 0 and by_name["w4-s0-k0.5"]["aligned_rows_per_caption"] > 0
    assert by_name["w0-s0-k0.5"]["aligned_rows_per_caption"] == 0  # contrast alone aligns nothing
    assert (tmp_path / "calibrate-counter-prior+in-prior-contrast-on-chair_i.png").stat().st_size > 1000

    # The presets walk the measured frontier: c = 0 the unmodified model, CHAIR_I falling as c rises.
    presets = parse_presets((tmp_path / PRESETS_FILE).read_text(), num_layers=4)
    assert presets.knots[0].c == 0 and presets.knots[0].omega == 0 and presets.knots[-1].c == 1
    assert presets.contrast and presets.calibration and presets.calibration["metric"] == "chair_i"
    measured = [k.measured["chair_i"] for k in presets.knots if k.measured]
    assert measured[0] == by_name["off"]["chair_i"]
    assert all(b < a for a, b in zip(measured, measured[1:], strict=False))
    walked = [w["setting"] for w in result["walk"]]
    assert walked[0] == "off" and len(walked) == len(presets.knots)
    for knot, name in zip(presets.knots[1:], walked[1:], strict=True):
        assert knot.omega == by_name[name]["omega"] and knot.start_layer == by_name[name]["start_layer"]

    # Again on CHAIR_S: every caption is on disk, so nothing is sent; where no setting lowers CHAIR_S below the
    # unmodified model's the command writes no presets and exits 1.
    middle = _caption_requests(server)
    (tmp_path / PRESETS_FILE).unlink()
    rc = chair_main([*args, "--metric", "chair_s"])
    assert _caption_requests(server) == middle
    result = json.loads((tmp_path / "calibrate-counter-prior+in-prior-contrast-on.json").read_text())
    off = next(p for p in result["points"] if p["name"] == "off")
    lowered = any(p["chair_s"] < off["chair_s"] for p in result["points"])
    assert rc == (0 if lowered else 1) and (tmp_path / PRESETS_FILE).exists() == lowered


def test_calibrate_refuses_start_layers_past_the_depth(server: LiveServer, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="start layers"):
        chair_main(
            [
                "calibrate",
                "--server",
                server.url,
                "--split",
                "counter-prior",
                "--limit",
                "1",
                "--start-layers",
                "9",
                "--out",
                str(tmp_path),
            ]
        )


def test_calibrate_reads_a_local_coco_folder(server: LiveServer, tmp_path: Path) -> None:
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2014").mkdir()
    for image_id, colour in ((42, (200, 40, 40)), (73, (40, 40, 200))):
        Image.new("RGB", (40, 32), colour).save(coco / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    (coco / "annotations" / "instances_val2014.json").write_text(
        json.dumps(
            {
                "images": [{"id": 42}, {"id": 73}],
                "categories": [{"id": 18, "name": "dog"}, {"id": 62, "name": "chair"}],
                "annotations": [{"image_id": 42, "category_id": 18}, {"image_id": 73, "category_id": 62}],
            }
        )
    )
    before = _caption_requests(server)
    rc = chair_main(
        [
            "calibrate",
            "--server",
            server.url,
            "--coco",
            str(coco),
            "--limit",
            "2",
            "--max-tokens",
            "6",
            "--omegas",
            "4",
            "--start-layers",
            "0",
            "--kappas",
            "0.5",
            "--contrast",
            "off",
            "--metric",
            "chair_i",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert _caption_requests(server) - before == 2 * 2  # 2 images x (unmodified + 1 setting)
    result = json.loads((tmp_path / "out" / "calibrate-coco-contrast-off-chair_i.json").read_text())
    assert (
        result["set"] == "coco" and result["n"] == 2 and [p["name"] for p in result["points"]] == ["off", "w4-s0-k0.5"]
    )
    lowered = result["points"][1]["chair_i"] < result["points"][0]["chair_i"]
    assert rc == (0 if lowered else 1) and (tmp_path / "out" / PRESETS_FILE).exists() == lowered
