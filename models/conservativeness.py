"""The per-request knob: `conservativeness` in [0, 1] (or a preset) -> SEVI parameters (spec section 5)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from models.paper_map import DEFAULT_KAPPA, omega_for, start_layer_for
from models.presets import PAPER_MAP, KnobMap

__all__ = [
    "DEFAULT_KAPPA",
    "PRESETS",
    "AlignmentParamError",
    "AlignmentParams",
    "omega_for",
    "parse_conservativeness",
    "resolve_alignment",
    "start_layer_for",
]

# The paper's preset names; a model's presets file may place `balanced` and `focused` elsewhere (models.presets).
PRESETS: dict[str, float] = {"off": 0.0, "balanced": 0.5, "focused": 1.0}


class AlignmentParamError(ValueError):
    """A knob value a request may not use. `param` names the offending field (for API error bodies)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class AlignmentParams:
    """What one request applies. `omega == 0` means the unmodified model."""

    conservativeness: float
    omega: float
    start_layer: int
    kappa: float
    contrast: bool

    @property
    def active(self) -> bool:
        return self.omega > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_conservativeness(
    value: float | int | str | None, default: float = 0.0, presets: Mapping[str, float] = PRESETS
) -> float:
    """A number in [0, 1] or a preset name (`off`, `balanced`, `focused`) -> a number in [0, 1]."""
    if value is None:
        return parse_conservativeness(default)
    if isinstance(value, bool):
        raise AlignmentParamError("conservativeness must be a number in [0, 1] or a preset", "conservativeness")
    if isinstance(value, str):
        key = value.strip().lower()
        if key in presets:
            return presets[key]
        try:
            number = float(key)
        except ValueError:
            names = ", ".join(presets)
            raise AlignmentParamError(
                f"unknown conservativeness preset {value!r}; use a number in [0, 1] or one of: {names}",
                "conservativeness",
            ) from None
        return parse_conservativeness(number)
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise AlignmentParamError(f"conservativeness must be in [0, 1], got {value}", "conservativeness")
    return number


def resolve_alignment(
    conservativeness: float | int | str | None,
    num_layers: int,
    *,
    omega: float | None = None,
    start_layer: int | None = None,
    kappa: float | None = None,
    contrast: bool | None = None,
    default_conservativeness: float = 0.0,
    knob_map: KnobMap | None = None,
) -> AlignmentParams:
    """Map the knob (or preset) to parameters; explicit overrides win over the mapping.

    `knob_map`: the model's own map (its presets file, `models.presets`); None is the paper's map below.
    Explicit values are checked here; the map's own values were checked when its file loaded.
    """
    knobs = knob_map or PAPER_MAP
    c = parse_conservativeness(conservativeness, default_conservativeness, knobs.names)
    point = knobs.point(c, num_layers)
    w = point.omega if omega is None else _check_omega(omega)
    layer = point.start_layer if start_layer is None else _check_start_layer(start_layer, num_layers)
    k = point.kappa if kappa is None else _check_kappa(kappa)
    use_contrast = (c > 0 and knobs.contrast) if contrast is None else bool(contrast)
    return AlignmentParams(conservativeness=c, omega=w, start_layer=layer, kappa=k, contrast=use_contrast)


def _check_omega(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AlignmentParamError("omega must be a number", "omega")
    if not math.isfinite(value) or value < 0 or value > 100:
        raise AlignmentParamError(f"omega must be in [0, 100], got {value}", "omega")
    return float(value)


def _check_start_layer(value: int, num_layers: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AlignmentParamError("start_layer must be an integer", "start_layer")
    if not 0 <= value <= num_layers:
        raise AlignmentParamError(f"start_layer must be in [0, {num_layers}], got {value}", "start_layer")
    return value


def _check_kappa(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AlignmentParamError("kappa must be a number", "kappa")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise AlignmentParamError(f"kappa must be in [0, 1], got {value}", "kappa")
    return float(value)
