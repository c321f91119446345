"""The SEVI parameters a request carries to vLLM (models/vllm_plugin/params.py) and the logits processor's
check of them."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402

from models.conservativeness import resolve_alignment  # noqa: E402
from models.vllm_plugin.logits_processor import SeviLogitsProcessor  # noqa: E402
from models.vllm_plugin.params import parse_row_request, to_extra_args  # noqa: E402

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
