"""`POST /v1/chat/completions`: OpenAI Chat Completions with image_url parts, streaming, and the SEVI knob."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from server.chat_support import refuse_unsupported
from server.deps import ArrivalDep, EngineDep, MetricsDep, SettingsDep, require_api_key
from server.errors import APIError
from server.intake import ImageSource, ImageURL, Knobs, RequestSpec, Sampling, build
from server.schemas.chat import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Choice,
    ChunkChoice,
    ChunkDelta,
)
from server.schemas.common import AppliedAlignment, Telemetry, Usage
from server.service import Run
from server.settings import Settings
from server.sse import EventStream, sse
from sevi.engines.api import GenerationRequest

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])

MAX_STOP = 4


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    summary="Chat completion (OpenAI).",
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true."}},
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    engine: EngineDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    arrival: ArrivalDep,
) -> ChatCompletionResponse | Response:
    if body.model is not None and body.model != engine.model_name:
        raise APIError(
            404,
            f"the model `{body.model}` does not exist; this server serves `{engine.model_name}`",
            param="model",
            code="model_not_found",
        )
    refuse_unsupported(body, engine.sampling_extensions)
    generation = await build(request_spec(body, settings), engine, settings)
    run = Run(arrival, request.receive, engine, metrics, settings, "/v1/chat/completions", generation)
    await run.start()
    created = int(time.time())
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(_chunks(run, generation, created, engine.model_name, usage))
    outcome = await run.collect()
    if outcome is None:
        return Response(status_code=499)  # client gone: nobody reads this
    response.headers.update(run.timing_headers())
    return ChatCompletionResponse(
        id=generation.request_id,
        created=created,
        model=engine.model_name,
        choices=[Choice(message=AssistantMessage(content=outcome.text), finish_reason=outcome.finish_reason)],
        usage=Usage.of(outcome.prompt_tokens, outcome.completion_tokens),
        alignment=AppliedAlignment.model_validate(generation.alignment),
        telemetry=Telemetry.of(outcome.telemetry),
    )


def request_spec(body: ChatCompletionRequest, settings: Settings) -> RequestSpec:
    """The chat body as a request spec (this route's, and the batch command's for OpenAI batch lines); refuses too
    many stop strings or images before any image is decoded."""
    max_tokens, max_param = (
        (body.max_completion_tokens, "max_completion_tokens")
        if body.max_completion_tokens is not None
        else (body.max_tokens, "max_tokens")
    )
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=_stops(body.stop),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        max_tokens_param=max_param,
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
    )
    over = body.alignment
    knobs = Knobs(
        body.conservativeness,
        over.omega if over else None,
        over.start_layer if over else None,
        over.kappa if over else None,
        over.contrast if over else None,
        param_prefix="alignment.",
    )
    messages, images = _messages(body.messages)
    if len(images) > settings.max_images_per_request:
        raise APIError(
            400,
            f"{len(images)} images; at most {settings.max_images_per_request} per request",
            param="messages",
            code="too_many_images",
        )
    return RequestSpec("chatcmpl", messages, images, knobs, sampling)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop sequences", param="stop", code="invalid_value")
    return tuple(s for s in stops if s)


def _messages(messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], list[ImageSource]]:
    """OpenAI messages -> the model's chat messages ({"type": "image"} placeholders) and their images, in order."""
    images: list[ImageSource] = []
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        content = msg.content
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": [{"type": "text", "text": content or ""}]})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            param = f"messages.{i}.content.{j}.image_url"
            if msg.role != "user":
                raise APIError(400, "images are accepted in user messages only", param=param, code="invalid_value")
            images.append(ImageURL(part.image_url.url, param))
            parts.append({"type": "image"})
        out.append({"role": role, "content": parts})
    return out, images


async def _chunks(
    run: Run, generation: GenerationRequest, created: int, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    """`chat.completion.chunk` events: role first, then text deltas, the finish reason, usage if asked, [DONE]."""
    applied = AppliedAlignment.model_validate(generation.alignment)

    def chunk(choices: list[ChunkChoice], **extra: Any) -> bytes:
        return sse(
            ChatCompletionChunk(id=generation.request_id, created=created, model=model, choices=choices, **extra)
        )

    yield chunk([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))], alignment=applied)
    try:
        async with aclosing(run.events()) as events:  # closed at once when the client leaves mid-stream
            async for ev in events:
                if ev.text:
                    yield chunk([ChunkChoice(delta=ChunkDelta(content=ev.text))])
                if ev.finish_reason is not None:
                    yield chunk(
                        [ChunkChoice(delta=ChunkDelta(), finish_reason=ev.finish_reason)],
                        alignment=applied,
                        telemetry=Telemetry.of(ev.telemetry),
                    )
                    if include_usage:
                        yield chunk([], usage=Usage.of(ev.prompt_tokens, ev.completion_tokens))
    except APIError as err:  # a deadline or engine failure after the headers went out: tell the client in-band
        yield sse(err.body())
    yield b"data: [DONE]\n\n"
