"""Pieces shared by the chat and caption schemas: the SEVI knob, the applied alignment, usage."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

# A number in [0, 1] or a preset; range and preset names are checked by sevi.method.knob (-> 400).
Conservativeness = Annotated[
    StrictFloat | StrictInt | StrictStr | None,
    Field(
        description="Hallucination-mitigation strength: a number in [0, 1] (0 = the unmodified model, "
        "0.5 = Balanced, 1 = Focused) or a preset name `off`, `balanced`, `focused`. "
        "Default: the server's default_conservativeness.",
        examples=[0.5, "balanced"],
    ),
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
    contrast: bool | None = Field(
        None, description="Cross-image contrastive decoding on/off (default: on when conservativeness > 0)."
    )


class AppliedAlignment(BaseModel):
    """The SEVI parameters this request ran with (`sevi.method.knob.AlignmentParams`)."""

    model_config = ConfigDict(from_attributes=True)

    conservativeness: float
    omega: float
    start_layer: int
    kappa: float
    contrast: bool


class Telemetry(BaseModel):
    """What the alignment did while generating: `sevi.method.telemetry.Telemetry`, field for field (a test holds the two
    equal), which both engines fill."""

    model_config = ConfigDict(from_attributes=True)

    aligned_rows: int = Field(default=0, description="Query rows aligned, summed over the aligned layers.")
    stage1_rows: int = Field(default=0, description="Aligned rows where stage 1 moved a head.")
    stage2_rows: int = Field(default=0, description="Aligned rows where stage 2 moved a head.")
    heads_reweighted: int = Field(default=0, description="Heads whose scores were moved, summed over rows and layers.")
    contrast_steps: int = Field(default=0, description="Tokens chosen by cross-image contrastive decoding.")
    contrast_dissolved: int = Field(
        default=0,
        description="1 when the request's contrast pair fell out of lockstep "
        "and the rest of the output had no contrast (vLLM engine), "
        "else 0.",
    )

    @classmethod
    def of(cls, telemetry: object | None) -> Telemetry:
        """From the engines' `sevi.method.telemetry.Telemetry` (zeros where an engine reported none)."""
        return cls() if telemetry is None else cls.model_validate(telemetry)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


__all__ = ["SEED_MAX", "AlignmentOverrides", "AppliedAlignment", "Conservativeness", "Strict", "Telemetry", "Usage"]
