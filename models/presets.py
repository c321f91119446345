"""Per-model knob presets: a model folder's `sevi_presets.json` says how `conservativeness` maps to SEVI's
parameters for that model (issue 16, item 3).

The paper's map (`models.conservativeness`) was tuned on LLaVA-1.5-7B; another model may need other
numbers for the same caution. The file holds piecewise-linear knots over c, measured on that model
(`python -m bench.chair calibrate` writes them), and which c the names `balanced` and `focused` stand for:

    {"format": 1,
     "balanced": 0.5, "focused": 1.0,
     "contrast": true,
     "knots": [{"c": 0.0, "omega": 0.0, "start_layer": 2, "kappa": 0.2},
               {"c": 0.5, "omega": 1.0, "start_layer": 2, "kappa": 0.2},
               {"c": 1.0, "omega": 4.0, "start_layer": 1, "kappa": 0.5}],
     "calibration": {...}}

Between knots omega and kappa are interpolated linearly and start_layer is interpolated and rounded
(half up). The first knot is c = 0 with omega = 0: c = 0 is the unmodified model (spec section 5), which
no file may change. `contrast` is the contrastive-decoding default at c > 0 (a request may still say
otherwise). Knots may carry `measured` figures (what calibration saw there); serving ignores them.

No file: the paper's map, as before. A file that does not validate raises :class:`PresetsError`
naming the file and the field, and the server refuses to start. This module imports nothing of the
server or of bench.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.paper_map import DEFAULT_KAPPA, omega_for, start_layer_for

PRESETS_FILE = "sevi_presets.json"
PAPER_PRESETS: dict[str, float] = {"off": 0.0, "balanced": 0.5, "focused": 1.0}


class PresetsError(ValueError):
    """A model's presets file that cannot be used; the message names the file and the field."""


class Knot(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    c: float = Field(ge=0.0, le=1.0, description="conservativeness at this knot")
    omega: float = Field(ge=0.0, le=100.0)
    start_layer: int = Field(ge=0, description="first aligned decoder layer (0-based) of this model")
    kappa: float = Field(ge=0.0, le=1.0)
    measured: dict[str, float] | None = Field(None, description="figures calibration measured here (informative)")


class KnobPresets(BaseModel):
    """The file's schema. Validation errors name fields as pydantic locates them (`knots.1.omega`)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    balanced: float = Field(0.5, gt=0.0, le=1.0, description="the c that the preset name `balanced` stands for")
    focused: float = Field(1.0, gt=0.0, le=1.0, description="the c that the preset name `focused` stands for")
    contrast: bool = Field(True, description="contrastive decoding at c > 0 unless a request says otherwise")
    knots: list[Knot] = Field(min_length=2)
    calibration: dict[str, Any] | None = Field(None, description="how the knots were measured (informative)")

    @model_validator(mode="after")
    def _shape(self) -> KnobPresets:
        first, last = self.knots[0], self.knots[-1]
        if first.c != 0.0 or first.omega != 0.0:
            raise ValueError("knots.0: the first knot must be c = 0 with omega = 0 (c = 0 is the unmodified model)")
        if last.c != 1.0:
            raise ValueError(f"knots.{len(self.knots) - 1}.c: the last knot must be c = 1, got {last.c}")
        for i in range(1, len(self.knots)):
            if self.knots[i].c <= self.knots[i - 1].c:
                raise ValueError(
                    f"knots.{i}.c: knots must be in strictly increasing c "
                    f"({self.knots[i].c} after {self.knots[i - 1].c})"
                )
        if self.focused <= self.balanced:
            raise ValueError(f"focused: must be a larger c than balanced ({self.focused} <= {self.balanced})")
        return self


@dataclass(frozen=True)
class Point:
    omega: float
    start_layer: int
    kappa: float


class KnobMap:
    """conservativeness -> (omega, start_layer, kappa) for one model, and what the preset names mean."""

    def __init__(self, presets: KnobPresets | None = None, source: str | None = None) -> None:
        self.presets = presets
        self.source = source  # the file read, or None for the paper's map

    @property
    def names(self) -> dict[str, float]:
        if self.presets is None:
            return dict(PAPER_PRESETS)
        return {"off": 0.0, "balanced": self.presets.balanced, "focused": self.presets.focused}

    @property
    def contrast(self) -> bool:
        return True if self.presets is None else self.presets.contrast

    def point(self, c: float, num_layers: int) -> Point:
        if self.presets is None:
            return Point(omega_for(c), start_layer_for(c, num_layers), DEFAULT_KAPPA)
        knots = self.presets.knots
        hi = next(i for i in range(1, len(knots)) if c <= knots[i].c or i == len(knots) - 1)
        a, b = knots[hi - 1], knots[hi]
        t = min(1.0, max(0.0, (c - a.c) / (b.c - a.c)))
        layer = int(math.floor(a.start_layer + t * (b.start_layer - a.start_layer) + 0.5))
        return Point(a.omega + t * (b.omega - a.omega), min(layer, num_layers), a.kappa + t * (b.kappa - a.kappa))

    def describe(self, num_layers: int | None) -> dict[str, Any]:
        """What /v1/models reports: where the map comes from and what each preset name applies."""
        out: dict[str, Any] = {
            "source": self.source or "default (LLaVA-1.5 paper map)",
            "contrast": self.contrast,
            "presets": None,
            "knots": None,
        }
        if num_layers is None and self.presets is not None:
            num_layers = max(k.start_layer for k in self.presets.knots)  # checked against the depth at load
        if num_layers is not None:
            out["presets"] = {
                name: {"conservativeness": c, **vars(self.point(c, num_layers))} for name, c in self.names.items()
            }
        if self.presets is not None:
            out["knots"] = [k.model_dump(exclude={"measured"}) for k in self.presets.knots]
        return out


PAPER_MAP = KnobMap()


def parse_presets(
    data: Mapping[str, Any] | str, source: str = PRESETS_FILE, num_layers: int | None = None
) -> KnobPresets:
    """Validate a presets document (parsed JSON or its text); errors name `source` and the field."""
    try:
        raw = json.loads(data) if isinstance(data, str) else data
    except json.JSONDecodeError as exc:
        raise PresetsError(f"{source}: not valid JSON ({exc})") from None
    try:
        presets = KnobPresets.model_validate(raw)
    except ValidationError as exc:
        # A whole-document check (_shape) has no location of its own; its message starts with the field.
        lines = [
            f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            if err["loc"]
            else "  " + err["msg"].removeprefix("Value error, ")
            for err in exc.errors()
        ]
        raise PresetsError(f"{source}: invalid knob presets\n" + "\n".join(lines)) from None
    if num_layers is not None:
        for i, knot in enumerate(presets.knots):
            if knot.start_layer > num_layers:
                raise PresetsError(
                    f"{source}: invalid knob presets\n  knots.{i}.start_layer: {knot.start_layer} "
                    f"is past the model's {num_layers} decoder layers"
                )
    return presets


def model_layers(model_dir: str | Path) -> int | None:
    """Decoder layers from the folder's config.json (text config for LLaVA / Qwen-VL), None when unknown."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
        text = config.get("text_config") or config
        return int(text["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_knob_map(model_dir: str | Path) -> KnobMap:
    """The model folder's knob map: its `sevi_presets.json` if present, else the paper's map."""
    path = Path(model_dir) / PRESETS_FILE
    if not path.exists():
        return PAPER_MAP
    try:
        text = path.read_text()
    except OSError as exc:
        raise PresetsError(f"{path}: cannot be read ({exc})") from None
    return KnobMap(parse_presets(text, str(path), model_layers(model_dir)), str(path))
