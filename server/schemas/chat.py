"""OpenAI Chat Completions, the subset an LVLM server honours, plus SEVI's `conservativeness` and `alignment`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.schemas.common import (
    SEED_MAX,
    AlignmentOverrides,
    AppliedAlignment,
    Conservativeness,
    Strict,
    Telemetry,
    Usage,
)


class ImageURL(BaseModel):
    url: str = Field(description="A data URI (`data:image/png;base64,...`), or an http(s) URL on an allow-listed host.")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="Accepted and ignored.")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = Field(
        None, description="Text, or a list of `text` and `image_url` parts (images only in user messages).")
    name: str | None = Field(None, description="Accepted and ignored.")


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send a last chunk with `usage` (and empty `choices`).")


class ChatCompletionRequest(Strict):
    # Unknown OpenAI fields (user, logit_bias, ...) are ignored, as other OpenAI-compatible servers do.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = Field(None, description="The served model id (GET /v1/models); default: that model.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (deprecated OpenAI name).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy (default).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass (default 1).")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Makes sampling and the contrast image draw "
                                                                  "reproducible.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the generation.")
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = Field(False, description="Server-sent events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    logprobs: bool | None = Field(None, description="Not supported: must be false or absent.")
    conservativeness: Conservativeness = None
    alignment: AlignmentOverrides | None = Field(None, description="Explicit SEVI parameters (extra field).")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    alignment: AppliedAlignment = Field(description="The SEVI parameters applied (extra field).")
    telemetry: Telemetry = Field(description="What the alignment did (extra field).")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sevi-serve"
    num_layers: int | None = Field(None, description="Decoder layers (start_layer is counted in these).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
