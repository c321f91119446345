"""The per-request knob, in one module: `conservativeness` in [0, 1] (or a preset name) -> SEVI's parameters
(spec section 5).

Three parts, one job (turn a request's knob into numbers):

- **The paper's map** (LLaVA-1.5-7B presets): c -> omega and start layer, kappa at the paper's 0.2. The map of
  every model without a presets file of its own.
- **A model folder's presets file** (`sevi_presets.json`, issue 16 item 3): another model may need other numbers
  for the same caution. The file holds piecewise-linear knots over c, measured on that model
  (`python -m bench.chair calibrate` writes them), and which c the names `balanced` and `focused` stand for:

      {"format": 1,
       "balanced": 0.5, "focused": 1.0,
       "contrast": true,
       "knots": [{"c": 0.0, "omega": 0.0, "start_layer": 2, "kappa": 0.2},
                 {"c": 0.5, "omega": 1.0, "start_layer": 2, "kappa": 0.2},
                 {"c": 1.0, "omega": 4.0, "start_layer": 1, "kappa": 0.5}],
       "calibration": {...}}

  Between knots omega and kappa are interpolated linearly and start_layer is interpolated and rounded (half
  up). The first knot is c = 0 with omega = 0: c = 0 is the unmodified model (spec section 5), which no file
  may change. `contrast` is the contrastive-decoding default at c > 0 (a request may still say otherwise).
  Knots may carry `measured` figures (what calibration saw there); serving ignores them. No file: the paper's
  map. A file that does not validate raises :class:`PresetsError` naming the file and the field, and the
  server (or `vllm serve`'s front end) refuses to start. A file is read once per process
  (:func:`load_knob_map` keeps what it read while the file is unchanged).
- **Resolution**: :func:`resolve_alignment`, the one function that turns a request's knob (a number, a preset
  name, or None for the server's default) and its explicit fields into :class:`AlignmentParams`. Each route
  calls it once per request where the request enters (sevi-serve's `server/intake.py`; `vllm serve`'s front
  end, `sevi/engines/vllm/plugin/params.py`; the CLI, `sevi/engines/reference/generate.py`); everything after
  reads the numbers.

Imports nothing of the server, of bench or of torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "DEFAULT_KAPPA",
    "PAPER_MAP",
    "PAPER_PRESETS",
    "PRESETS_FILE",
    "PRESET_NAMES",
    "AlignmentParamError",
    "AlignmentParams",
    "KnobMap",
    "KnobPresets",
    "PresetsError",
    "load_knob_map",
    "model_layers",
    "omega_for",
    "parse_conservativeness",
    "parse_presets",
    "resolve_alignment",
    "start_layer_for",
]

PRESETS_FILE = "sevi_presets.json"
# The preset names, defined here only. `off` is always c = 0; a presets file may place the other two elsewhere.
PRESET_NAMES = ("off", "balanced", "focused")
PAPER_PRESETS: dict[str, float] = dict(zip(PRESET_NAMES, (0.0, 0.5, 1.0), strict=True))

# ---- the paper's map ----------------------------------------------------------------------------------------

DEFAULT_KAPPA = 0.2
BALANCED_OMEGA = 0.5
FOCUSED_OMEGA = 4.0
# Start layer as a share of depth: 8/32 up to Balanced, moving to 4/32 at Focused (LLaVA-1.5-7B presets).
BALANCED_START_FRACTION = 8 / 32
FOCUSED_START_FRACTION = 4 / 32


def omega_for(c: float) -> float:
    """Linear 0 -> 0.5 on [0, 0.5], geometric 0.5 -> 4 on [0.5, 1]: continuous and increasing."""
    if c <= 0.5:
        return BALANCED_OMEGA * (c / 0.5)
    return BALANCED_OMEGA * (FOCUSED_OMEGA / BALANCED_OMEGA) ** ((c - 0.5) / 0.5)


def start_layer_for(c: float, num_layers: int) -> int:
    """Non-increasing in c: 8/32 of the depth up to c = 0.5, then linearly to 4/32 at c = 1."""
    if c <= 0.5:
        fraction = BALANCED_START_FRACTION
    else:
        t = (c - 0.5) / 0.5
        fraction = BALANCED_START_FRACTION + t * (FOCUSED_START_FRACTION - BALANCED_START_FRACTION)
    return int(math.floor(fraction * num_layers + 0.5))


# ---- a model folder's presets file --------------------------------------------------------------------------


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
        return dict(zip(PRESET_NAMES, (0.0, self.presets.balanced, self.presets.focused), strict=True))

    @property
    def contrast(self) -> bool:
        return True if self.presets is None else self.presets.contrast

    def contrast_for(self, c: float, asked: bool | None) -> bool:
        """Contrastive decoding at knob `c`: the request's own say, else the map's default at c > 0."""
        return (c > 0 and self.contrast) if asked is None else bool(asked)

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


# What load_knob_map read, by file: (its mtime and size when read, the map). A process reads a folder's file
# once (the server's engine, vLLM's front end in the same process and the CLI share it); a file changed on
# disk since is read again.
_loaded: dict[Path, tuple[tuple[int, int], KnobMap]] = {}


def load_knob_map(model_dir: str | Path) -> KnobMap:
    """The model folder's knob map: its `sevi_presets.json` if present, else the paper's map."""
    path = Path(model_dir) / PRESETS_FILE
    try:
        stat = path.stat()
    except OSError:  # no file (or a hub id rather than a folder): the paper's map
        return PAPER_MAP
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _loaded.get(path.absolute())
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        text = path.read_text()
    except OSError as exc:
        raise PresetsError(f"{path}: cannot be read ({exc})") from None
    knobs = KnobMap(parse_presets(text, str(path), model_layers(model_dir)), str(path))
    _loaded[path.absolute()] = (stamp, knobs)
    return knobs


# ---- resolution ---------------------------------------------------------------------------------------------


class AlignmentParamError(ValueError):
    """A knob value a request may not use. `param` names the offending field (for API error bodies)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class AlignmentParams:
    """What one request applies: the resolved numbers. `omega == 0` means the unmodified model."""

    conservativeness: float  # the knob as a number (a preset name resolved); informative past resolution
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
    value: float | int | str | None, default: float = 0.0, presets: Mapping[str, float] = PAPER_PRESETS
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
    """A request's knob -> the numbers it runs with. Explicit values win over the map, and are checked here
    (the map's own values were checked when its file loaded).

    `knob_map`: the served model's map (`load_knob_map` of its folder); None is the paper's map.
    """
    knobs = knob_map or PAPER_MAP
    c = parse_conservativeness(conservativeness, default_conservativeness, knobs.names)
    point = knobs.point(c, num_layers)
    w = point.omega if omega is None else check_omega(omega)
    layer = point.start_layer if start_layer is None else check_start_layer(start_layer, num_layers)
    k = point.kappa if kappa is None else check_kappa(kappa)
    return AlignmentParams(c, w, layer, k, knobs.contrast_for(c, contrast))


def check_omega(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AlignmentParamError("omega must be a number", "omega")
    if not math.isfinite(value) or value < 0 or value > 100:
        raise AlignmentParamError(f"omega must be in [0, 100], got {value}", "omega")
    return float(value)


def check_start_layer(value: int, num_layers: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AlignmentParamError("start_layer must be an integer", "start_layer")
    if not 0 <= value <= num_layers:
        raise AlignmentParamError(f"start_layer must be in [0, {num_layers}], got {value}", "start_layer")
    return value


def check_kappa(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AlignmentParamError("kappa must be a number", "kappa")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise AlignmentParamError(f"kappa must be in [0, 1], got {value}", "kappa")
    return float(value)
