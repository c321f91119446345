"""Per-model knob presets (sevi/method/knob.py): a model folder's sevi_presets.json, valid, invalid and absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sevi.method.knob import (
    PAPER_MAP,
    PRESETS_FILE,
    AlignmentParamError,
    KnobMap,
    PresetsError,
    load_knob_map,
    parse_presets,
    resolve_alignment,
)
from tests.support.presets import model_folder, presets_doc
from tests.support.repo import REPO


def test_absent_file_is_the_paper_map(tmp_path: Path) -> None:
    knobs = load_knob_map(model_folder(tmp_path))
    assert knobs is PAPER_MAP and knobs.source is None
    for c in (0, 0.1, 0.5, 0.8, 1):
        assert resolve_alignment(c, 32, knob_map=knobs) == resolve_alignment(c, 32)
    card = knobs.describe(32)
    assert card["source"].startswith("default") and card["knots"] is None
    assert card["presets"]["balanced"] == {"conservativeness": 0.5, "omega": 0.5, "start_layer": 8, "kappa": 0.2}
    assert card["presets"]["focused"]["start_layer"] == 4


def test_valid_file_maps_knots_names_and_contrast(tmp_path: Path) -> None:
    knobs = load_knob_map(model_folder(tmp_path, presets=presets_doc(contrast=False)))
    assert knobs.source == str(tmp_path / PRESETS_FILE)
    # At the knots exactly, and linear in between (start layer rounded half up: 3 -> 0 over c in [0.4, 1]).
    assert resolve_alignment(0.4, 4, knob_map=knobs).omega == pytest.approx(1.0)
    mid = resolve_alignment(0.7, 4, knob_map=knobs)
    assert (mid.omega, mid.start_layer, mid.kappa) == (pytest.approx(2.0), 2, pytest.approx(0.35))
    assert resolve_alignment(0.2, 4, knob_map=knobs).omega == pytest.approx(0.5)
    # Named presets stand for the file's c values; c = 0 stays the unmodified model.
    bal = resolve_alignment("balanced", 4, knob_map=knobs)
    assert (bal.conservativeness, bal.omega, bal.start_layer) == (0.4, pytest.approx(1.0), 3)
    foc = resolve_alignment("focused", 4, knob_map=knobs)
    assert (foc.omega, foc.start_layer, foc.kappa) == (3.0, 0, 0.5)
    off = resolve_alignment("off", 4, knob_map=knobs)
    assert off.omega == 0 and not off.active and not off.contrast
    # The file's contrast default, and a request's own say over it.
    assert not foc.contrast and resolve_alignment(1, 4, contrast=True, knob_map=knobs).contrast
    # Explicit values still win, and are still checked.
    assert resolve_alignment(1, 4, omega=0.3, kappa=0.1, knob_map=knobs).omega == 0.3
    with pytest.raises(AlignmentParamError):
        resolve_alignment("cautious", 4, knob_map=knobs)
    card = knobs.describe(4)
    assert card["presets"]["balanced"]["conservativeness"] == 0.4 and card["contrast"] is False
    assert card["knots"][2] == {"c": 1.0, "omega": 3.0, "start_layer": 0, "kappa": 0.5}  # `measured` left out


def test_map_is_monotone_where_the_knots_are(tmp_path: Path) -> None:
    knobs = load_knob_map(model_folder(tmp_path, presets=presets_doc()))
    params = [resolve_alignment(i / 100, 4, knob_map=knobs) for i in range(101)]
    assert all(b.omega >= a.omega and b.start_layer <= a.start_layer for a, b in zip(params, params[1:], strict=False))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            {
                "knots": [
                    {"c": 0.0, "omega": 0.5, "start_layer": 1, "kappa": 0.2},
                    {"c": 1.0, "omega": 1.0, "start_layer": 1, "kappa": 0.2},
                ]
            },
            "knots.0",
        ),
        (
            {
                "knots": [
                    {"c": 0.0, "omega": 0.0, "start_layer": 1, "kappa": 0.2},
                    {"c": 0.9, "omega": 1.0, "start_layer": 1, "kappa": 0.2},
                ]
            },
            "knots.1.c",
        ),
        (
            {
                "knots": [
                    {"c": 0.0, "omega": 0.0, "start_layer": 1, "kappa": 0.2},
                    {"c": 0.5, "omega": 1.0, "start_layer": 1, "kappa": 0.2},
                    {"c": 0.5, "omega": 2.0, "start_layer": 1, "kappa": 0.2},
                    {"c": 1.0, "omega": 3.0, "start_layer": 1, "kappa": 0.2},
                ]
            },
            "knots.2.c",
        ),
        (
            {
                "knots": [
                    {"c": 0.0, "omega": 0.0, "start_layer": 1, "kappa": 0.2},
                    {"c": 1.0, "omega": -1.0, "start_layer": 1, "kappa": 0.2},
                ]
            },
            "knots.1.omega",
        ),
        (
            {
                "knots": [
                    {"c": 0.0, "omega": 0.0, "start_layer": 1, "kappa": 0.2},
                    {"c": 1.0, "omega": 1.0, "start_layer": 1, "kappa": 1.5},
                ]
            },
            "knots.1.kappa",
        ),
        (
            {
                "knots": [
                    {"c": 0.0, "omega": 0.0, "start_layer": 1, "kappa": 0.2},
                    {"c": 1.0, "omega": 1.0, "start_layer": 9, "kappa": 0.2},
                ]
            },
            "knots.1.start_layer",
        ),
        (
            {
                "knots": [
                    {"c": 0.0, "omega": 0.0, "start_layer": 1, "kappa": 0.2},
                    {"c": 1.0, "omega": 1.0, "start_layer": 1},
                ]
            },
            "knots.1.kappa",
        ),
        ({"knots": [{"c": 0.0, "omega": 0.0, "start_layer": 1, "kappa": 0.2}]}, "knots"),
        ({"balanced": 1.0, "focused": 0.8}, "focused"),
        ({"balanced": 0}, "balanced"),
        ({"format": 2}, "format"),
        ({"omega": 4}, "omega"),  # unknown fields are refused, not ignored (a typo would silently do nothing)
    ],
)
def test_invalid_file_names_the_field(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    folder = model_folder(tmp_path, layers=4, presets=presets_doc(**change))
    with pytest.raises(PresetsError) as err:
        load_knob_map(folder)
    message = str(err.value)
    assert str(folder / PRESETS_FILE) in message
    assert f"  {field}:" in message or f"  {field} " in message, message


def test_unreadable_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PresetsError, match="not valid JSON"):
        load_knob_map(model_folder(tmp_path, presets='{"knots": ['))


def test_parse_presets_accepts_a_mapping_and_checks_depth_only_when_known() -> None:
    doc = presets_doc()
    doc["knots"][0]["start_layer"] = 40
    assert parse_presets(doc).knots[0].start_layer == 40
    with pytest.raises(PresetsError, match="knots.0.start_layer"):
        parse_presets(doc, num_layers=32)
    assert KnobMap(parse_presets(presets_doc())).point(1.0, 2).start_layer == 0


def test_server_refuses_to_start_on_a_bad_file(tmp_path: Path) -> None:
    """`python -m server` stops before loading anything, with the file and the field in its message."""
    folder = model_folder(tmp_path, presets=presets_doc(focused=0.2))
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--model", str(folder), "--engine", "transformers", "--port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert PRESETS_FILE in proc.stderr and "focused:" in proc.stderr


@pytest.mark.parametrize("engine_name", ["transformers", "vllm"])
def test_both_engines_read_the_folder_s_presets_before_loading(tmp_path: Path, engine_name: str) -> None:
    if engine_name == "vllm":
        pytest.importorskip("vllm")
    from server.settings import Settings
    from sevi.engines import create_engine

    good = model_folder(tmp_path / "good", presets=presets_doc())
    engine = create_engine(Settings(model=good, engine=engine_name))
    assert not engine.ready  # nothing loaded: the file was read on its own
    assert engine.knob_map.source == str(good / PRESETS_FILE) and engine.knob_map.names["balanced"] == 0.4
    bad = model_folder(tmp_path / "bad", presets=presets_doc(contrast="sometimes"))
    with pytest.raises(PresetsError, match="contrast"):
        create_engine(Settings(model=bad, engine=engine_name))
    assert create_engine(Settings(model=model_folder(tmp_path / "none"), engine=engine_name)).knob_map is PAPER_MAP
