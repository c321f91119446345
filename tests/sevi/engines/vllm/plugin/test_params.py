"""The SEVI parameters a request carries to vLLM (sevi/engines/vllm/plugin/params.py): the resolved row's encoder and
decoder, the front end's one resolution of a `vllm serve` user's raw knob (front_end.py, validate_params), and
the scheduler and the worker reading the same decoded row."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder  # noqa: E402

from sevi.engines.vllm.plugin import front_end  # noqa: E402
from sevi.engines.vllm.plugin.logits_processor import SeviLogitsProcessor  # noqa: E402
from sevi.engines.vllm.plugin.params import ROW_KEY, RowRequest, from_extra_args, to_extra_args  # noqa: E402
from sevi.engines.vllm.plugin.scheduler import SeviScheduler  # noqa: E402
from sevi.engines.vllm.plugin.state import STATE  # noqa: E402
from sevi.method.knob import (  # noqa: E402
    PAPER_MAP,
    PRESETS_FILE,
    AlignmentParamError,
    PresetsError,
    load_knob_map,
    resolve_alignment,
)
from tests.support.presets import model_folder, presets_doc  # noqa: E402
from tests.support.vllm_plugin import PLUGIN_IMAGE, add_rows, processor  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_state")


def serve(layers: int = 4, model_dir: Path | None = None) -> front_end.ServedModel:
    """What vLLM's front end records for the served model (front_end.install does it in InputProcessor)."""
    return front_end.configure(str(model_dir or "tiny-llava/not-a-folder"), SimpleNamespace(num_hidden_layers=layers))


def validated(extra: dict[str, Any]) -> SamplingParams:
    """A request's params after vLLM's front end ran the logits processor's validate_params on them."""
    sp = SamplingParams(temperature=0.0, extra_args=dict(extra))
    SeviLogitsProcessor.validate_params(sp)
    return sp


def decoded(sp: SamplingParams) -> RowRequest:
    row = from_extra_args(sp.extra_args)
    assert row is not None
    return row


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
        {"start_layer": 5},  # past the served model's 4 layers
        {"sevi_role": "main"},
        {"sevi_role": "boss", "sevi_pair": "p"},
    ],
)
def test_validate_params_refuses_bad_values(extra: dict[str, object]) -> None:
    serve(layers=4)
    with pytest.raises(ValueError):
        SeviLogitsProcessor.validate_params(SamplingParams(extra_args=extra))


def test_validate_params_accepts_good_values_and_ignores_foreign_args() -> None:
    serve(layers=4)
    sp = validated({"conservativeness": "balanced", "kappa": 0.3, "unrelated": 1})
    # Resolved once, here: the raw keys are gone, the row carries the numbers, foreign keys stay.
    assert set(sp.extra_args) == {ROW_KEY, "unrelated"}  # type: ignore[arg-type]
    assert decoded(sp).alignment == resolve_alignment("balanced", 4, kappa=0.3, contrast=False)
    for extra in ({"unrelated": 1}, {"sevi_id": "k"}, None):
        sp = SamplingParams(extra_args=copy.deepcopy(extra))
        SeviLogitsProcessor.validate_params(sp)
        assert sp.extra_args == extra and from_extra_args(sp.extra_args) is None
    # vllm_xargs from a form may carry numbers as strings
    row = decoded(validated({"omega": "2.5", "start_layer": "1"}))
    assert row.alignment is not None and row.alignment.omega == 2.5 and row.alignment.start_layer == 1
    # Twice on the same params (vLLM callers may share them): the second run finds the resolved row.
    sp = validated({"conservativeness": 0.7})
    again = copy.deepcopy(sp.extra_args)
    SeviLogitsProcessor.validate_params(sp)
    assert sp.extra_args == again


def test_extra_args_round_trip_and_contrast_rows_are_never_aligned() -> None:
    params = resolve_alignment(None, 4, omega=3.0, start_layer=1, kappa=0.6)
    main = from_extra_args(to_extra_args(params, role="main", pair="p", key="k", seed=7))
    contrast = from_extra_args(to_extra_args(params, role="contrast", pair="p", seed=7))
    alone = from_extra_args(to_extra_args(params, key="solo", seed=7))  # a seed only travels with a pair
    assert main == RowRequest(params, "main", "p", "k", 7) and main.aligned
    assert contrast == RowRequest(params, "contrast", "p", None, 7) and not contrast.aligned
    assert alone == RowRequest(params, None, None, "solo", None) and alone.aligned
    # As vLLM carries SamplingParams to the engine core in its own process (msgpack): the same row.
    sp = SamplingParams(extra_args=to_extra_args(params, role="main", pair="p", key="k", seed=7))
    carried = MsgpackDecoder(SamplingParams).decode(MsgpackEncoder().encode(sp))
    assert from_extra_args(carried.extra_args) == main
    # Only resolved numbers travel: no preset name, no raw knob key.
    named = to_extra_args(resolve_alignment("focused", 4))
    assert set(named) == {ROW_KEY} and named[ROW_KEY]["alignment"]["conservativeness"] == 1.0


def _row(**changes: Any) -> dict[str, Any]:
    enc = to_extra_args(resolve_alignment(0.5, 4), role="main", pair="p", key="k", seed=1)[ROW_KEY]
    alignment = {**enc["alignment"], **changes.pop("alignment", {})}
    return {ROW_KEY: {**enc, "alignment": alignment, **changes}}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({ROW_KEY: 1}, ROW_KEY),
        ({ROW_KEY: {"format": 1}}, ROW_KEY),
        (_row(format=2), ROW_KEY),
        (_row(extra_field=1), ROW_KEY),
        (_row(alignment={"omega": -1.0}), "omega"),
        (_row(alignment={"omega": "2"}), "omega"),
        (_row(alignment={"kappa": 1.5}), "kappa"),
        (_row(alignment={"start_layer": "1"}), "start_layer"),
        (_row(alignment={"start_layer": -1}), "start_layer"),
        (_row(alignment={"conservativeness": "balanced"}), "conservativeness"),
        (_row(alignment={"contrast": "yes"}), "contrast"),
        (_row(role="boss"), "sevi_role"),
        (_row(role=None), "sevi_pair"),
        (_row(pair=3), "sevi_pair"),
        (_row(seed="1"), "sevi_seed"),
        (_row(id=5), "sevi_id"),
        ({**_row(), "conservativeness": 0.5}, "conservativeness"),  # a resolved row and a raw knob
    ],
)
def test_malformed_extra_args_are_refused(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(AlignmentParamError) as err:
        from_extra_args(extra)
    assert err.value.param == param
    serve(layers=4)  # and the front end says so (a 400 in vLLM's server), rather than passing it on
    with pytest.raises(ValueError):
        SeviLogitsProcessor.validate_params(SamplingParams(extra_args=extra))


@pytest.mark.parametrize("extra", [{"conservativeness": 0.5}, {"omega": 1.0}, {"sevi_role": "main", "sevi_pair": "p"}])
def test_decoder_refuses_a_raw_knob_no_front_end_resolved(extra: dict[str, Any]) -> None:
    """The worker and the scheduler never resolve: a raw knob reaching them is refused (each then leaves the row
    unaligned, so they still agree), never mapped with a guess at the served model's presets."""
    with pytest.raises(AlignmentParamError, match="unresolved"):
        from_extra_args(extra)


# ---- the served folder's knob presets (`vllm serve` reads them as our server does) ----


def test_front_end_maps_the_knob_with_the_served_folder_s_presets(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, layers=4, presets=presets_doc())
    served = serve(layers=4, model_dir=folder)
    assert served.knob_map.source == str(folder / PRESETS_FILE)
    assert served.knob_map is load_knob_map(folder)  # read once per process (unchanged file)
    for knob in ("balanced", 0.7, 1.0):
        got = decoded(validated({"conservativeness": knob})).alignment
        want = resolve_alignment(knob, 4, knob_map=load_knob_map(folder))
        assert got is not None and (got.omega, got.start_layer, got.kappa) == (want.omega, want.start_layer, want.kappa)
    balanced = decoded(validated({"conservativeness": "balanced"})).alignment
    paper = resolve_alignment("balanced", 4)
    assert balanced is not None
    assert (balanced.conservativeness, balanced.omega) == (0.4, 1.0) != (paper.conservativeness, paper.omega)
    # Explicit values still win over the file's map.
    explicit = decoded(validated({"conservativeness": 1.0, "omega": 0.25})).alignment
    assert explicit is not None and explicit.omega == 0.25 and explicit.kappa == 0.5


def test_front_end_without_a_presets_file_keeps_the_paper_map(tmp_path: Path) -> None:
    assert serve(layers=4, model_dir=model_folder(tmp_path, layers=4)).knob_map is PAPER_MAP
    assert serve(layers=4).knob_map is PAPER_MAP  # a hub id rather than a folder
    got = decoded(validated({"conservativeness": "focused"})).alignment
    assert got == resolve_alignment("focused", 4, contrast=False)


def test_bad_presets_file_stops_the_front_end_naming_the_field(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, layers=4, presets=presets_doc(focused=0.2))
    with pytest.raises(PresetsError, match="focused"):
        serve(layers=4, model_dir=folder)


def test_front_end_records_the_served_model_when_vllm_builds_its_input_processor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    built: list[Any] = []
    # The real constructor needs a whole engine config; the wrapper's job is what runs before it.
    monkeypatch.setattr(InputProcessor, "__init__", lambda self, config, *a, **k: built.append(config))
    front_end.install()
    front_end.install()  # idempotent: one wrapper
    folder = model_folder(tmp_path, layers=6, presets=presets_doc())
    config = SimpleNamespace(
        model_config=SimpleNamespace(model=str(folder), hf_config=SimpleNamespace(num_hidden_layers=6))
    )
    InputProcessor(config)  # type: ignore[arg-type]
    served = front_end.served()
    assert built == [config] and served is not None
    assert served.num_layers == 6 and served.knob_map.source == str(folder / PRESETS_FILE)


# ---- scheduler and worker read the one decoded row ----


def scheduled_aligned(sp: SamplingParams, monkeypatch: pytest.MonkeyPatch) -> tuple[bool, tuple[str, str] | None]:
    """What SeviScheduler.add_request records for a request (aligned? its pair role), vLLM's own bookkeeping
    left out (it needs a whole engine)."""
    monkeypatch.setattr(Scheduler, "add_request", lambda self, request: None)
    sched = object.__new__(SeviScheduler)
    sched._aligned, sched._role, sched._pairs, sched._complete = set(), {}, {}, set()
    sched.add_request(SimpleNamespace(request_id="r", sampling_params=sp))  # type: ignore[arg-type]
    return "r" in sched._aligned, sched._role.get("r")


def worker_aligned(sp: SamplingParams) -> bool:
    """What the logits processor files for the request (the row the attention backends read)."""
    STATE.reset()
    proc = processor(layers=4)
    add_rows(proc, [(0, sp.extra_args, [1, PLUGIN_IMAGE, 7], [])], 1)
    row = STATE.rows[0]
    assert row is not None
    return row.request.aligned


def test_scheduler_and_worker_agree_where_the_served_presets_and_the_paper_map_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This model's file leaves it unmodified up to c = 0.6; the paper's map aligns from any c > 0.
    knots = [
        {"c": 0.0, "omega": 0.0, "start_layer": 1, "kappa": 0.2},
        {"c": 0.6, "omega": 0.0, "start_layer": 1, "kappa": 0.2},
        {"c": 1.0, "omega": 3.0, "start_layer": 1, "kappa": 0.6},
    ]
    folder = model_folder(tmp_path, layers=4, presets=presets_doc(balanced=0.5, knots=knots))
    serve(layers=4, model_dir=folder)
    for knob, aligned in ((0.5, False), ("balanced", False), (0.9, True)):
        assert resolve_alignment(knob, 4).active  # the paper's map would align every one of them
        sp = validated({"conservativeness": knob})
        assert decoded(sp).aligned is aligned
        assert scheduled_aligned(sp, monkeypatch) == (aligned, None)
        assert worker_aligned(sp) is aligned
    # A pair as a `vllm serve` caller names it: both sides see the roles, only the main row is aligned.
    main = validated({"conservativeness": 0.9, "sevi_role": "main", "sevi_pair": "p"})
    contrast = validated({"conservativeness": 0.9, "sevi_role": "contrast", "sevi_pair": "p"})
    assert scheduled_aligned(main, monkeypatch) == (True, ("main", "p")) and worker_aligned(main)
    assert scheduled_aligned(contrast, monkeypatch) == (False, ("contrast", "p")) and not worker_aligned(contrast)
