"""`POST /caption`: one image in, one caption out. The same fields arrive as multipart form fields or JSON."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from server.schemas.common import SEED_MAX, AppliedAlignment, Conservativeness, Strict, Telemetry, Usage
from sevi.families import DEFAULT_PROMPT as DEFAULT_PROMPT  # the playground serves it from here


class CaptionParams(Strict):
    """Everything but the image. Explicit omega/start_layer/kappa win over what conservativeness maps to."""

    prompt: str = Field(DEFAULT_PROMPT, min_length=1, max_length=20_000, description="Instruction text.")
    conservativeness: Conservativeness = None
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (default: the server's).")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy (default).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass (default 1).")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Reproducible sampling and contrast draw.")
    contrast: bool | None = Field(
        None, description="Cross-image contrastive decoding (default: on when conservativeness > 0)."
    )
    omega: float | None = Field(None, description="Explicit re-weighting strength (>= 0).")
    start_layer: int | None = Field(None, description="Explicit first aligned layer (0-based).")
    kappa: float | None = Field(None, description="Explicit core-head threshold in [0, 1].")


class CaptionJSON(CaptionParams):
    image: str = Field(description="The image as base64 or a data URI (`data:image/png;base64,...`).")


class CaptionResponse(BaseModel):
    id: str
    object: Literal["caption"] = "caption"
    created: int
    model: str
    caption: str
    finish_reason: str | None
    usage: Usage
    alignment: AppliedAlignment
    telemetry: Telemetry


def request_body_openapi() -> dict[str, Any]:
    """The /caption request body for OpenAPI: the route parses it by hand (two media types, one handler)."""
    json_schema = CaptionJSON.model_json_schema()
    form_schema = CaptionParams.model_json_schema()
    form_schema["properties"] = {
        "image": {"type": "string", "format": "binary", "description": "The image file (PNG, JPEG, WebP, GIF, BMP)."},
        **form_schema["properties"],
    }
    form_schema["required"] = ["image"]
    form_schema["title"] = "CaptionForm"
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": form_schema},
                "application/json": {"schema": json_schema},
            },
        }
    }
