"""Pieces shared by the chat and caption schemas: the SEVI knob, the applied alignment, usage."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

# A number in [0, 1] or a preset; range and preset names are checked by models.conservativeness (-> 400).
Conservativeness = Annotated[
    StrictFloat | StrictInt | StrictStr | None,
    Field(description="Hallucination-mitigation strength: a number in [0, 1] (0 = the unmodified model, "
                      "0.5 = Balanced, 1 = Focused) or a preset name `off`, `balanced`, `focused`. "
                      "Default: the server's default_conservativeness.",
          examples=[0.5, "balanced"]),
]

SEED_MAX = 2**63 - 1


class Strict(BaseModel):
    """Bodies refuse NaN and infinities (Python's JSON parser accepts `NaN`)."""

    model_config = ConfigDict(allow_inf_nan=False)


class AlignmentOverrides(Strict):
    """Explicit SEVI parameters; each one given wins over what `conservativeness` maps to."""

    omega: float | None = Field(None, description="Re-weighting strength (>= 0; 0 = off).", examples=[0.5])
    start_layer: int | None = Field(None, description="First decoder layer aligned (0-based).", examples=[8])
    kappa: float | None = Field(None, description="Core-head threshold in [0, 1].", examples=[0.2])
    contrast: bool | None = Field(None, description="Cross-image contrastive decoding on/off "
                                                    "(default: on when conservativeness > 0).")


class AppliedAlignment(BaseModel):
    """The SEVI parameters this request ran with."""

    conservativeness: float
    omega: float
    start_layer: int
    kappa: float
    contrast: bool


class Telemetry(BaseModel):
    """What the alignment did while generating: rows aligned, rows where each stage applied, heads re-weighted."""

    aligned_rows: int = 0
    stage1_rows: int = 0
    stage2_rows: int = 0
    heads_reweighted: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


__all__ = ["SEED_MAX", "AlignmentOverrides", "AppliedAlignment", "Conservativeness", "Strict", "Telemetry", "Usage"]
