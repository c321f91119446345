"""`POST /v1/chat/completions`: OpenAI Chat Completions with image_url parts, streaming, and the SEVI knob."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from models.generation import GenerationRequest
from server.deps import EngineDep, MetricsDep, SettingsDep, require_api_key
from server.engines.base import Engine
from server.errors import APIError
from server.images import ImageLimits, load_image_url
from server.schemas.chat import ChatCompletionRequest, ChatCompletionResponse, ChatMessage
from server.service import Knobs, Run, new_id, resolve_knobs, sampling_params
from server.settings import Settings
from server.sse import EventStream, sse

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])

MAX_STOP = 4


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, summary="Chat completion (OpenAI).",
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true."}})
async def chat_completions(body: ChatCompletionRequest, request: Request, engine: EngineDep, settings: SettingsDep,
                           metrics: MetricsDep) -> Response:
    if body.model is not None and body.model != engine.model_name:
        raise APIError(404, f"the model `{body.model}` does not exist; this server serves `{engine.model_name}`",
                       param="model", code="model_not_found")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_value")
    stop = _stops(body.stop)
    max_tokens, max_param = ((body.max_completion_tokens, "max_completion_tokens")
                             if body.max_completion_tokens is not None else (body.max_tokens, "max_tokens"))
    sampling = sampling_params(settings, max_tokens, body.temperature, body.top_p, body.seed, stop, max_param)
    over = body.alignment
    knobs = Knobs(body.conservativeness, over.omega if over else None, over.start_layer if over else None,
                  over.kappa if over else None, over.contrast if over else None, param_prefix="alignment.")
    alignment = resolve_knobs(knobs, engine, settings)
    messages, images = await _messages(body.messages, settings)
    rid = new_id("chatcmpl")
    run = Run(request, engine, metrics, settings, "/v1/chat/completions",
              GenerationRequest(rid, messages, images, alignment, sampling))
    await run.start()
    created = int(time.time())
    applied = alignment.to_dict()
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(_chunks(run, rid, created, engine, applied, usage))
    outcome = await run.collect()
    if outcome is None:
        return Response(status_code=499)  # client gone: nobody reads this
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": engine.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.text},
                     "finish_reason": outcome.finish_reason, "logprobs": None}],
        "usage": _usage(outcome.prompt_tokens, outcome.completion_tokens),
        "alignment": applied, "telemetry": outcome.telemetry,
    }, headers=run.timing_headers())


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop sequences", param="stop", code="invalid_value")
    return tuple(s for s in stops if s)


async def _messages(messages: list[ChatMessage], settings: Settings) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """OpenAI messages -> the model's chat messages ({"type": "image"} placeholders) and the decoded images."""
    limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
    urls: list[tuple[str, str]] = []
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
            urls.append((part.image_url.url, param))
            parts.append({"type": "image"})
        out.append({"role": role, "content": parts})
    if len(urls) > settings.max_images_per_request:
        raise APIError(400, f"{len(urls)} images; at most {settings.max_images_per_request} per request",
                       param="messages", code="too_many_images")
    images = [await load_image_url(url, limits, settings.allowed_image_hosts, settings.image_fetch_timeout_s, param)
              for url, param in urls]
    return out, images


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _chunks(run: Run, rid: str, created: int, engine: Engine, applied: dict[str, Any],
                  include_usage: bool) -> AsyncIterator[bytes]:
    """`chat.completion.chunk` events: role first, then text deltas, the finish reason, usage if asked, [DONE]."""
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.model_name}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return sse({**head, "choices": [choice], **extra})

    yield chunk({"role": "assistant", "content": ""}, alignment=applied)
    try:
        async with aclosing(run.events()) as events:  # closed at once when the client leaves mid-stream
            async for ev in events:
                if ev.text:
                    yield chunk({"content": ev.text})
                if ev.finish_reason is not None:
                    yield chunk({}, ev.finish_reason, alignment=applied, telemetry=ev.telemetry or {})
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": _usage(ev.prompt_tokens, ev.completion_tokens)})
    except APIError as err:  # a deadline or engine failure after the headers went out: tell the client in-band
        yield sse(err.body())
    yield b"data: [DONE]\n\n"
