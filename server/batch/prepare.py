"""One (item, level) -> the engine's `GenerationRequest`, through the API's own intake (`server.intake`), so a batch
result equals what `POST /caption` (folder and manifest items) or `POST /v1/chat/completions` (OpenAI batch lines)
answers for the same image and fields: the same schema checks, knob resolution, limits and image decoding.

An item's image is read and decoded once for all its levels (`ImageTask`), in the preprocessing pool, with the
API's decoder (`server.images.open_image`, the function behind /caption's upload path).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from concurrent.futures import Executor
from typing import Any

from PIL import Image
from pydantic import ValidationError

from server.batch.config import BatchSettings, Level
from server.batch.inputs import Item
from server.chat_support import refuse_unsupported
from server.errors import APIError, from_validation_errors
from server.images import open_image
from server.intake import ImageURL, Knobs, RequestSpec, Sampling, build, image_limits, new_id, resolve_knobs
from server.intake import sampling_params as resolve_sampling
from server.routes.chat import request_spec
from server.schemas.caption import CaptionParams
from server.schemas.chat import ChatCompletionRequest
from sevi.engines.api import Engine, GenerationRequest, user_message
from sevi.families import DEFAULT_PROMPT
from sevi.method.knob import parse_conservativeness

_CAPTION_FIELDS = set(CaptionParams.model_fields)


def levels_for(item: Item, levels: list[Level] | None, default: float) -> list[Level | None]:
    """The levels an item runs at: its own conservativeness if it names one, else each of `--levels`, else the
    server's default (OpenAI batch lines without `--levels`: None, the request as written)."""
    if item.is_chat:
        assert item.body is not None
        own = item.body.get("conservativeness")
        if levels is None:
            return [None]
        return [own] if own is not None else list(levels)
    own = item.fields.get("conservativeness")
    if own is not None:
        return [own]
    return list(levels) if levels is not None else [default]


def check_levels(levels: list[Level], engine: Engine) -> None:
    """Refuse a level no request could run at, before the job starts (the model's preset names count)."""
    for level in levels:
        parse_conservativeness(level, presets=engine.knob_map.names)


def read_image_file(path: str, max_bytes: int) -> bytes:
    try:
        size = os.stat(path).st_size
        if size > max_bytes:
            raise APIError(413, f"image is larger than {max_bytes} bytes", param="image", code="image_too_large")
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except FileNotFoundError:
        raise APIError(400, f"no such image file: {path}", param="image", code="image_not_found") from None
    except IsADirectoryError:
        raise APIError(400, f"not an image file: {path}", param="image", code="invalid_image") from None
    except PermissionError:
        raise APIError(400, f"cannot read image file: {path}", param="image", code="invalid_image") from None


def _decode_file(path: str, settings: BatchSettings) -> Image.Image:
    return open_image(read_image_file(path, settings.max_image_bytes), image_limits(settings), "image")


async def load_image(item: Item, settings: BatchSettings, pool: Executor) -> Image.Image:
    """The item's image decoded within the API's limits (an APIError otherwise)."""
    assert item.image is not None
    low = item.image[:8].lower()
    if low.startswith("data:") or low.startswith("http://") or low.startswith("https://"):
        return await ImageURL(item.image, "image").load(settings)  # /v1/chat/completions' image_url path
    return await asyncio.get_running_loop().run_in_executor(pool, _decode_file, item.image, settings)


def caption_params(item: Item) -> CaptionParams:
    """A manifest line's fields checked by /caption's own schema (unknown fields refused, as its JSON body does)."""
    unknown = sorted(set(item.fields) - _CAPTION_FIELDS)
    if unknown:
        raise APIError(400, f"unknown field(s): {', '.join(unknown)}", param=unknown[0], code="invalid_value")
    try:
        return CaptionParams.model_validate(item.fields)
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors())) from None


async def caption_request(
    item: Item,
    level: Level | None,
    image: asyncio.Future[Image.Image],
    engine: Engine,
    settings: BatchSettings,
) -> GenerationRequest:
    """What /caption builds for this item at this level: knobs, then sampling, then the (shared) decoded image."""
    fields = dict(item.fields)
    if level is not None:
        fields["conservativeness"] = level
    if settings.prompt is not None:
        fields.setdefault("prompt", settings.prompt)
    if settings.max_tokens is not None:
        fields.setdefault("max_tokens", settings.max_tokens)
    params = caption_params(dataclasses.replace(item, fields=fields))
    knobs = Knobs(params.conservativeness, params.omega, params.start_layer, params.kappa, params.contrast)
    alignment = resolve_knobs(knobs, engine, settings)
    sampling = resolve_sampling(
        Sampling(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, seed=params.seed),
        settings,
    )
    decoded = await asyncio.shield(image)
    return GenerationRequest(
        new_id("cap"), user_message(params.prompt or DEFAULT_PROMPT, 1), [decoded], alignment, sampling
    )


async def chat_request(item: Item, level: Level | None, engine: Engine, settings: BatchSettings) -> GenerationRequest:
    """What /v1/chat/completions builds for this batch line; `level` fills a body that names no conservativeness."""
    assert item.body is not None
    raw: dict[str, Any] = dict(item.body)
    if raw.get("stream"):
        raise APIError(
            400, "stream: a batch request is answered whole, not streamed", param="stream", code="unsupported_value"
        )
    try:
        body = ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors())) from None
    if body.model is not None and body.model != engine.model_name:
        raise APIError(
            404,
            f"the model `{body.model}` does not exist; this server serves `{engine.model_name}`",
            param="model",
            code="model_not_found",
        )
    refuse_unsupported(body, engine.sampling_extensions)
    spec: RequestSpec = request_spec(body, settings)
    if level is not None and body.conservativeness is None:
        spec = dataclasses.replace(spec, knobs=dataclasses.replace(spec.knobs, conservativeness=level))
    return await build(spec, engine, settings)
