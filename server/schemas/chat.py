"""OpenAI Chat Completions: the request with every OpenAI field, the response and the stream chunks, plus SEVI's
`conservativeness`, `alignment` (request) and `telemetry` (response)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

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
from server.schemas.vllm_extensions import VllmChatExtensions


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


# Fields a client may send that the server cannot honour are declared too (typed loosely, so the refusal names
# them): `server.chat_support` answers each with a 400 naming the field instead of ignoring it.
_REFUSED = "Not supported: refused with a 400 that names the field."
_NO_EFFECT = "Accepted; has no effect on the output."


class ChatMessage(BaseModel):
    """Every field of OpenAI's message types; the tool-calling and audio ones are refused when given."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = Field(
        None, description="Text, or a list of `text` and `image_url` parts (images only in user messages)."
    )
    name: str | None = Field(None, description="Accepted and ignored.")
    refusal: Any = Field(None, description=_REFUSED)
    tool_calls: Any = Field(None, description=_REFUSED)
    function_call: Any = Field(None, description=_REFUSED)
    audio: Any = Field(None, description=_REFUSED)
    tool_call_id: Any = Field(None, description=_REFUSED)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="Send a last chunk with `usage` (and empty `choices`).")
    include_obfuscation: bool | None = Field(None, description="Only false (or absent): no obfuscation padding.")


class ChatCompletionRequest(Strict, VllmChatExtensions):
    """OpenAI's chat completion parameters, every one of them (`openai.types.chat.CompletionCreateParams`; a test
    holds this list to the installed client's), vLLM's extensions (`server.schemas.vllm_extensions`), plus the SEVI
    fields `conservativeness` and `alignment`. What the server cannot honour is refused with a 400 naming the field
    (`server.chat_support`); so are fields neither OpenAI nor vLLM has."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, description="The served model id (GET /v1/models); default: that model.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (deprecated OpenAI name).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy (default).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass (default 1).")
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="Makes sampling and the contrast image draw reproducible."
    )
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the generation.")
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, description="Subtracted from the logit of every token generated so far (default 0)."
    )
    frequency_penalty: float | None = Field(
        None,
        ge=-2,
        le=2,
        description="Times the count of each token generated so far, subtracted from its logit (default 0).",
    )
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = Field(False, description="Server-sent events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    logprobs: bool | None = Field(None, description="Not supported: must be false or absent.")
    # Accepted without effect: they tag, route or cache a request and never change what is generated.
    user: str | None = Field(None, description=_NO_EFFECT)
    safety_identifier: str | None = Field(None, description=_NO_EFFECT)
    metadata: dict[str, str] | None = Field(None, description=_NO_EFFECT)
    prompt_cache_key: str | None = Field(None, description=_NO_EFFECT)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = Field(None, description=_NO_EFFECT)
    prompt_cache_options: dict[str, Any] | None = Field(None, description=_NO_EFFECT)
    # Accepted with the one value the server honours, refused with any other.
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = Field(
        None, description="`auto` or `default` (the one tier)."
    )
    store: bool | None = Field(None, description="Only false (or absent): completions are not stored.")
    modalities: list[Literal["text", "audio"]] | None = Field(None, description='Only `["text"]`.')
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="Only `none`: the models do not reason before answering."
    )
    response_format: dict[str, Any] | None = Field(
        None, description='Only `{"type": "text"}` (no JSON mode, no structured output).'
    )
    # Refused when given.
    tools: list[Any] | None = Field(None, description=_REFUSED)
    tool_choice: Any = Field(None, description="Only `none`.")
    parallel_tool_calls: bool | None = Field(None, description=_REFUSED)
    functions: list[Any] | None = Field(None, description=_REFUSED)
    function_call: Any = Field(None, description="Only `none`.")
    logit_bias: dict[str, Any] | None = Field(None, description=_REFUSED)
    top_logprobs: int | None = Field(None, description=_REFUSED)
    audio: Any = Field(None, description=_REFUSED)
    prediction: Any = Field(None, description=_REFUSED)
    web_search_options: Any = Field(None, description=_REFUSED)
    moderation: Any = Field(None, description=_REFUSED)
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description=_REFUSED)
    # SEVI.
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


def _absent(value: object) -> bool:
    return value is None


class ChunkDelta(BaseModel):
    """The new part of the message: the role in the first chunk, then text; empty in the last."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_absent)
    content: str | None = Field(default=None, exclude_if=_absent)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed completion. The first chunk carries the applied `alignment`, the last
    with a `finish_reason` carries it again with the `telemetry`; `usage` comes alone, in a chunk with no choices,
    when `stream_options.include_usage` asks for it. Fields a chunk does not carry are left out."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    # Left out of the JSON where a chunk does not carry them. Field(exclude_if): about 20 us a chunk here, half what a
    # Python model_serializer took (json.dumps of the hand-built dict it replaced: about 17 us).
    usage: Usage | None = Field(default=None, exclude_if=_absent)
    alignment: AppliedAlignment | None = Field(default=None, exclude_if=_absent, description="Extra field.")
    telemetry: Telemetry | None = Field(default=None, exclude_if=_absent, description="Extra field.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sevi-serve"
    num_layers: int | None = Field(None, description="Decoder layers (start_layer is counted in these).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
