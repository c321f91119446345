"""`GET /v1/models` with what the knob means for the served model (issue 16: per-model knob presets).

The OpenAI card (`server.schemas.chat.ModelCard`) plus one extra field, `conservativeness`: where the
model's map comes from (its folder's `sevi_presets.json`, or the paper's LLaVA-1.5 map), what each preset
name applies, and the file's knots.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from server.schemas.chat import ModelCard, ModelList


class PresetPoint(BaseModel):
    conservativeness: float
    omega: float
    start_layer: int
    kappa: float


class Knot(BaseModel):
    c: float
    omega: float
    start_layer: int
    kappa: float


class KnobMapCard(BaseModel):
    source: str = Field(
        description="The model folder's sevi_presets.json, or the default (the paper's LLaVA-1.5 "
        "map, start layer scaled to the model's depth)."
    )
    contrast: bool = Field(
        description="Cross-image contrastive decoding at conservativeness > 0 unless a request says otherwise."
    )
    presets: dict[str, PresetPoint] | None = Field(
        None, description="What `off`, `balanced` and `focused` apply (null while the model loads)."
    )
    knots: list[Knot] | None = Field(
        None,
        description="The presets file's knots: omega and kappa follow c linearly between them, start_layer "
        "too, rounded (null for the paper's map).",
    )


class ServedModelCard(ModelCard):
    conservativeness: KnobMapCard = Field(description="How the knob maps to SEVI's parameters for this model.")


class ServedModelList(ModelList):
    data: list[ServedModelCard]  # type: ignore[assignment]  # a narrower card than the OpenAI list's
