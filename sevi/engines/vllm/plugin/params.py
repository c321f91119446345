"""Per-request SEVI parameters as they travel in `SamplingParams.extra_args`: one typed encoder / decoder.

What travels is the RESOLVED row, under one key (`sevi`): the numbers the request runs with (omega, start
layer, kappa, contrast, and the knob as a number), its contrast-pair role, pair id, telemetry key and seed. The
knob is resolved once, where the request enters, and never again:

- sevi-serve's engines get :class:`AlignmentParams` from `server/intake.py` and write them with
  :func:`to_extra_args`;
- users of vLLM's own OpenAI server send the raw knob as flat `vllm_xargs` (`conservativeness` as a number or
  a preset name, `omega`, `start_layer`, `kappa`, `sevi_role`, `sevi_pair`, `sevi_id`; flat because
  `vllm_xargs` values must be scalars). vLLM's front end calls the logits processor's `validate_params`,
  which resolves them here (:func:`resolve_front_end`) with the served model's depth and knob map
  (`front_end.py`) and puts the encoded row in their place.

The scheduler (`SeviScheduler.add_request`), the logits processor (`update_state`) and through it the
attention backends read the decoded row only (:func:`from_extra_args`), so they agree by construction on
whether a row is aligned. `sevi_seed` is a sampled pair's seed: the engine gives it here instead of
`SamplingParams.seed`, because the logits processor samples the pair itself and vLLM's own per-request
generator would be rewound after every partial prefill chunk, which CPU generators refuse (`CPU Generator
does not use offset`).

Only torch-free code lives here: the front end imports it before any model exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sevi.method.knob import (
    AlignmentParamError,
    AlignmentParams,
    KnobMap,
    check_kappa,
    check_omega,
    parse_conservativeness,
    resolve_alignment,
)

ROW_KEY = "sevi"  # the encoded row: a dict, which vllm_xargs (scalars only) cannot carry
ROW_FORMAT = 1
# The flat keys a `vllm serve` user may send (the raw knob, its explicit overrides, a pair), resolved in the
# front end and replaced there by the encoded row.
KNOB_KEYS = ("conservativeness", "omega", "start_layer", "kappa")
ROLE_KEY = "sevi_role"
PAIR_KEY = "sevi_pair"
ID_KEY = "sevi_id"
SEED_KEY = "sevi_seed"
RAW_KEYS = (*KNOB_KEYS, ROLE_KEY, PAIR_KEY, ID_KEY, SEED_KEY)
_ASKING_KEYS = (*KNOB_KEYS, ROLE_KEY, PAIR_KEY)  # the raw keys that make a request SEVI's
ROLES = ("main", "contrast")
_ALIGNMENT_FIELDS = {"conservativeness", "omega", "start_layer", "kappa", "contrast"}
_ROW_FIELDS = {"format", "alignment", "role", "pair", "id", "seed"}


@dataclass(frozen=True)
class RowRequest:
    """What one vLLM request asks of the worker: alignment (None = off), its contrast-pair role and pair, the key
    its telemetry is filed under, and a sampled pair's seed."""

    alignment: AlignmentParams | None
    role: str | None
    pair: str | None
    key: str | None
    seed: int | None = None

    @property
    def aligned(self) -> bool:
        # The contrast branch is the unmodified model (spec section 3), whatever its knobs say.
        return self.alignment is not None and self.alignment.active and self.role != "contrast"


# ---- the encoder / decoder ----------------------------------------------------------------------------------


def encode_row(row: RowRequest) -> dict[str, Any]:
    """The `sevi` entry of extra_args for a resolved row: plain values, which vLLM's msgpack carries across
    processes as they are."""
    a = row.alignment
    return {
        "format": ROW_FORMAT,
        "alignment": None if a is None else a.to_dict(),
        "role": row.role,
        "pair": row.pair,
        "id": row.key,
        "seed": row.seed,
    }


def to_extra_args(
    alignment: AlignmentParams,
    *,
    role: str | None = None,
    pair: str | None = None,
    key: str | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The extra_args our engines send for a resolved parameter set (the seed only for a pair's rows)."""
    row = RowRequest(alignment, role, pair if role is not None else None, key, seed if role is not None else None)
    _check_pair(row.role, row.pair)
    return {ROW_KEY: encode_row(row)}


def from_extra_args(extra: Mapping[str, Any] | None) -> RowRequest | None:
    """The decoded row of a request's extra_args; None when it carries none (a request SEVI leaves alone).

    Raises AlignmentParamError on a malformed row, and on a raw knob that was never resolved (the front end
    resolves it: a worker that saw it would have to guess the served model's map)."""
    if not extra:
        return None
    raw = [k for k in RAW_KEYS if k in extra]
    if ROW_KEY not in extra:
        asks = [k for k in raw if k in _ASKING_KEYS]
        if asks:
            raise AlignmentParamError(
                f"unresolved SEVI keys {asks} in extra_args (vLLM's front end resolves them)", asks[0]
            )
        return None  # none, or sevi_id / sevi_seed alone, which ask nothing of SEVI
    if raw:
        raise AlignmentParamError(f"extra_args carries both a resolved SEVI row and the raw keys {raw}", raw[0])
    enc = extra[ROW_KEY]
    if not isinstance(enc, Mapping) or set(enc) != _ROW_FIELDS or enc["format"] != ROW_FORMAT:
        raise AlignmentParamError(f"{ROW_KEY} must be a format-{ROW_FORMAT} row with {sorted(_ROW_FIELDS)}", ROW_KEY)
    role, pair, key, seed = enc["role"], enc["pair"], enc["id"], enc["seed"]
    _check_pair(role, pair)
    if key is not None and not isinstance(key, str):
        raise AlignmentParamError(f"{ROW_KEY}.id must be a string", ID_KEY)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise AlignmentParamError(f"{ROW_KEY}.seed must be an integer", SEED_KEY)
    return RowRequest(_decode_alignment(enc["alignment"]), role, pair, key, seed)


def _decode_alignment(value: Any) -> AlignmentParams | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != _ALIGNMENT_FIELDS:
        raise AlignmentParamError(f"{ROW_KEY}.alignment must have {sorted(_ALIGNMENT_FIELDS)}", ROW_KEY)
    contrast = value["contrast"]
    if not isinstance(contrast, bool):
        raise AlignmentParamError(f"{ROW_KEY}.alignment.contrast must be a boolean", "contrast")
    c = value["conservativeness"]
    if isinstance(c, bool) or not isinstance(c, int | float):  # a preset name was resolved before it got here
        raise AlignmentParamError(f"{ROW_KEY}.alignment.conservativeness must be a number", "conservativeness")
    start = value["start_layer"]
    # Only its type and sign: the depth was checked where the row was resolved, and a start layer past the
    # depth aligns no layer.
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise AlignmentParamError(f"{ROW_KEY}.alignment.start_layer must be a non-negative integer", "start_layer")
    return AlignmentParams(
        conservativeness=parse_conservativeness(c),
        omega=check_omega(value["omega"]),
        start_layer=start,
        kappa=check_kappa(value["kappa"]),
        contrast=contrast,
    )


def _check_pair(role: Any, pair: Any) -> None:
    if role is not None and role not in ROLES:
        raise AlignmentParamError(f"{ROLE_KEY} must be one of {ROLES}, got {role!r}", ROLE_KEY)
    if (role is None) != (pair is None):
        raise AlignmentParamError(f"{ROLE_KEY} and {PAIR_KEY} go together", PAIR_KEY)
    if pair is not None and not isinstance(pair, str):
        raise AlignmentParamError(f"{PAIR_KEY} must be a string", PAIR_KEY)


# ---- the front end: a `vllm serve` user's raw keys -> the encoded row -----------------------------------------


def resolve_front_end(extra: Mapping[str, Any] | None, num_layers: int, knob_map: KnobMap) -> dict[str, Any] | None:
    """The extra_args to send on for a request as vLLM's front end received it: None when they need no change
    (no SEVI keys, or an already resolved row, which is checked here); otherwise the foreign keys as they were
    and the raw SEVI keys resolved, once, with the served model's depth and knob map. AlignmentParamError on a
    bad value."""
    if not extra:
        return None
    if ROW_KEY in extra:
        from_extra_args(extra)  # checked; our engines' rows, or a front end's that ran before
        return None
    if not any(k in extra for k in _ASKING_KEYS):
        return None  # sevi_id or sevi_seed alone ask nothing of SEVI (as before)
    role, pair, key, seed = extra.get(ROLE_KEY), extra.get(PAIR_KEY), extra.get(ID_KEY), _integer(extra, SEED_KEY)
    _check_pair(role, pair)
    alignment: AlignmentParams | None = None
    if any(k in extra for k in KNOB_KEYS):
        alignment = resolve_alignment(
            extra.get("conservativeness"),
            num_layers,
            omega=_number(extra, "omega"),
            start_layer=_integer(extra, "start_layer"),
            kappa=_number(extra, "kappa"),
            # vLLM's server supplies no contrast image: contrast is a pair the caller names (sevi_role / pair).
            contrast=role is not None,
            knob_map=knob_map,
        )
    row = RowRequest(alignment, role, pair, str(key) if key is not None else None, seed)
    out = {k: v for k, v in extra.items() if k not in RAW_KEYS}
    out[ROW_KEY] = encode_row(row)
    return out


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
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise AlignmentParamError(f"{name} must be an integer, got {value!r}", name)
    return value
