"""The SEVI parameters a request carries to vLLM (models/vllm_plugin/params.py) and the logits processor's
check of them."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402

from models.conservativeness import resolve_alignment  # noqa: E402
from models.presets import PAPER_MAP, PRESETS_FILE, PresetsError, load_knob_map  # noqa: E402
from models.vllm_plugin.logits_processor import SeviLogitsProcessor  # noqa: E402
from models.vllm_plugin.params import parse_row_request, to_extra_args  # noqa: E402
from models.vllm_plugin.state import STATE  # noqa: E402
from tests.helpers import model_folder, presets_doc, processor  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_state")


@pytest.mark.parametrize(
    "extra",
    [
        {"conservativeness": 1.5},
        {"conservativeness": "loud"},
        {"omega": -1},
        {"omega": "x"},
        {"kappa": 2},
        {"start_layer": -1},
        {"start_layer": "two"},
        {"sevi_role": "main"},
        {"sevi_role": "boss", "sevi_pair": "p"},
    ],
)
def test_validate_params_refuses_bad_values(extra: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SeviLogitsProcessor.validate_params(SamplingParams(extra_args=extra))


def test_validate_params_accepts_good_values_and_ignores_foreign_args() -> None:
    SeviLogitsProcessor.validate_params(SamplingParams(extra_args={"conservativeness": "balanced", "kappa": 0.3}))
    SeviLogitsProcessor.validate_params(SamplingParams(extra_args={"unrelated": 1}))
    SeviLogitsProcessor.validate_params(SamplingParams())
    # vllm_xargs from a form may carry numbers as strings
    row = parse_row_request({"omega": "2.5", "start_layer": "1"}, 4)
    assert row.alignment is not None and row.alignment.omega == 2.5 and row.alignment.start_layer == 1


def test_extra_args_round_trip_and_contrast_rows_are_never_aligned() -> None:
    params = resolve_alignment(None, 4, omega=3.0, start_layer=1, kappa=0.6)
    main = parse_row_request(to_extra_args(params, role="main", pair="p", key="k"), 4)
    contrast = parse_row_request(to_extra_args(params, role="contrast", pair="p"), 4)
    assert main.alignment == params and main.aligned and main.key == "k"
    assert contrast.alignment == params and not contrast.aligned


# ---- the served folder's knob presets (`vllm serve` reads them as our server does) ----


def test_worker_maps_the_knob_with_the_served_folder_s_presets(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, layers=4, presets=presets_doc())
    processor(layers=4, model_dir=folder)
    assert STATE.knob_map.source == str(folder / PRESETS_FILE)
    for knob in ("balanced", 0.7, 1.0):
        got = parse_row_request({"conservativeness": knob}, STATE.num_layers, STATE.knob_map).alignment
        want = resolve_alignment(knob, 4, knob_map=load_knob_map(folder))
        assert got is not None and (got.omega, got.start_layer, got.kappa) == (want.omega, want.start_layer, want.kappa)
    balanced = parse_row_request({"conservativeness": "balanced"}, 4, STATE.knob_map).alignment
    paper = parse_row_request({"conservativeness": "balanced"}, 4).alignment
    assert balanced is not None and paper is not None
    assert (balanced.conservativeness, balanced.omega) == (0.4, 1.0) != (paper.conservativeness, paper.omega)
    # Explicit values still win over the file's map.
    explicit = parse_row_request({"conservativeness": 1.0, "omega": 0.25}, 4, STATE.knob_map).alignment
    assert explicit is not None and explicit.omega == 0.25 and explicit.kappa == 0.5


def test_worker_without_a_presets_file_keeps_the_paper_map(tmp_path: Path) -> None:
    processor(layers=4, model_dir=model_folder(tmp_path, layers=4))
    assert STATE.knob_map is PAPER_MAP
    processor(layers=4)  # a hub id rather than a folder
    assert STATE.knob_map is PAPER_MAP


def test_bad_presets_file_stops_the_worker_naming_the_field(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, layers=4, presets=presets_doc(focused=0.2))
    with pytest.raises(PresetsError, match="focused"):
        processor(layers=4, model_dir=folder)
