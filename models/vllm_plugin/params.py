"""Per-request SEVI parameters as they travel in `SamplingParams.extra_args`.

Two ways in, one format: our engine writes the keys below; users of vLLM's own OpenAI server send the
same flat keys in `vllm_xargs` (flat because `vllm_xargs` values must be scalars). Keys:

- `conservativeness` (number in [0, 1] or preset name), `omega`, `start_layer`, `kappa`: the knob and
  its explicit overrides, as in spec section 5;
- `sevi_role` (`main` | `contrast`) and `sevi_pair` (an id shared by the two rows): contrastive
  decoding pairs, written by our engine only (a contrast row needs a contrast image, which the engine
  supplies);
- `sevi_id`: a key under which the worker files the request's alignment telemetry;
- `sevi_seed`: a sampled pair's seed. The engine gives it here instead of `SamplingParams.seed`: the logits
  processor samples the pair itself, and vLLM's own per-request generator would be rewound after every
  partial prefill chunk, which CPU generators refuse (`CPU Generator does not use offset`).

Only torch-free code lives here: the front end (validate_params) imports it before any model exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models.conservativeness import AlignmentParamError, AlignmentParams, resolve_alignment
from models.presets import KnobMap

KNOB_KEYS = ("conservativeness", "omega", "start_layer", "kappa")
ROLE_KEY = "sevi_role"
PAIR_KEY = "sevi_pair"
ID_KEY = "sevi_id"
SEED_KEY = "sevi_seed"
ROLES = ("main", "contrast")
# Without a model at hand (vLLM's front end validates before the worker exists), start_layer is only
# checked for being a non-negative integer; the worker clamps nothing, a layer past the depth aligns none.
UNKNOWN_DEPTH = 1 << 20


@dataclass(frozen=True)
class RowRequest:
    """What one vLLM request asks of the worker: alignment (None = off) and its contrast-pair role."""

    alignment: AlignmentParams | None
    role: str | None
    pair: str | None
    key: str | None

    @property
    def aligned(self) -> bool:
        # The contrast branch is the unmodified model (spec section 3), whatever its knobs say.
        return self.alignment is not None and self.alignment.active and self.role != "contrast"


def has_sevi_args(extra: Mapping[str, Any] | None) -> bool:
    return bool(extra) and any(k in extra for k in (*KNOB_KEYS, ROLE_KEY, PAIR_KEY))  # type: ignore[operator]


def parse_row_request(
    extra: Mapping[str, Any] | None, num_layers: int | None = None, knob_map: KnobMap | None = None
) -> RowRequest:
    """Validate and resolve the SEVI keys of `extra_args`; raises AlignmentParamError on bad values.

    `knob_map`: the served model's own map (its `sevi_presets.json`), which the worker reads at start-up, so
    `vllm serve` users' `conservativeness` means what it means in our server; None is the paper's map.
    """
    if not extra:
        return RowRequest(None, None, None, None)
    depth = num_layers if num_layers is not None else UNKNOWN_DEPTH
    alignment: AlignmentParams | None = None
    if any(k in extra for k in KNOB_KEYS):
        alignment = resolve_alignment(
            extra.get("conservativeness"),
            depth,
            omega=_number(extra, "omega"),
            start_layer=_integer(extra, "start_layer"),
            kappa=_number(extra, "kappa"),
            knob_map=knob_map,
        )
    role = extra.get(ROLE_KEY)
    pair = extra.get(PAIR_KEY)
    if role is not None and role not in ROLES:
        raise AlignmentParamError(f"{ROLE_KEY} must be one of {ROLES}, got {role!r}", ROLE_KEY)
    if (role is None) != (pair is None):
        raise AlignmentParamError(f"{ROLE_KEY} and {PAIR_KEY} go together", PAIR_KEY)
    if pair is not None and not isinstance(pair, str):
        raise AlignmentParamError(f"{PAIR_KEY} must be a string", PAIR_KEY)
    key = extra.get(ID_KEY)
    return RowRequest(alignment, role, pair, str(key) if key is not None else None)


def _number(extra: Mapping[str, Any], name: str) -> float | None:
    value = extra.get(name)
    if value is None:
        return None
    if isinstance(value, str):  # vllm_xargs from a form or CLI may carry numbers as strings
        try:
            return float(value)
        except ValueError:
            raise AlignmentParamError(f"{name} must be a number, got {value!r}", name) from None
    return value  # type: ignore[no-any-return]  # resolve_alignment checks the type


def _integer(extra: Mapping[str, Any], name: str) -> int | None:
    value = extra.get(name)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise AlignmentParamError(f"{name} must be an integer, got {value!r}", name) from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value  # type: ignore[no-any-return]


def to_extra_args(
    alignment: AlignmentParams,
    *,
    role: str | None = None,
    pair: str | None = None,
    key: str | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The extra_args our engine sends for a resolved parameter set (explicit values, no re-mapping)."""
    out: dict[str, Any] = {
        "conservativeness": alignment.conservativeness,
        "omega": alignment.omega,
        "start_layer": alignment.start_layer,
        "kappa": alignment.kappa,
    }
    if role is not None:
        out[ROLE_KEY] = role
        out[PAIR_KEY] = pair
        if seed is not None:
            out[SEED_KEY] = seed
    if key is not None:
        out[ID_KEY] = key
    return out
