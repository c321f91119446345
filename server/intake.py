"""From an HTTP request to the engine's `GenerationRequest`: the one place every generation route goes through.

A route reads its own body (OpenAI messages, the /caption form or JSON) into a :class:`RequestSpec`: what
the client asked for, in the route's field names, with its images not yet decoded. :func:`build` then
resolves the SEVI knobs, applies the server's sampling defaults and limits, and only then decodes (or
fetches) the images, so a request with an invalid value is refused before any image work.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from server.errors import APIError
from server.images import ImageLimits, decode_image, load_image_url
from server.settings import Settings
from sevi.engines.api import Engine, GenerationRequest, SamplingParams
from sevi.method.knob import AlignmentParamError, AlignmentParams, resolve_alignment


@dataclass(frozen=True)
class Knobs:
    """The SEVI fields of a request: the knob and the explicit parameters that override what it maps to."""

    conservativeness: float | int | str | None
    omega: float | None = None
    start_layer: int | None = None
    kappa: float | None = None
    contrast: bool | None = None
    param_prefix: str = ""  # "alignment." when the explicit values came nested


@dataclass(frozen=True)
class Sampling:
    """The sampling fields of a request, before the server's defaults and limits (None: the default)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_tokens_param: str = "max_tokens"  # the field a max_tokens over the limit is blamed on
    # vLLM's sampling extensions (server.schemas.vllm_extensions), None: vLLM's default.
    ignore_eos: bool = False
    min_tokens: int = 0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: tuple[int, ...] = ()
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class ImageSource(Protocol):
    """An image as the request gave it; `load` decodes it within the server's limits (4xx otherwise)."""

    async def load(self, settings: Settings) -> Image.Image: ...


@dataclass(frozen=True)
class ImageURL:
    """An OpenAI `image_url`: a data URI, or an http(s) URL on an allow-listed host."""

    url: str
    param: str

    async def load(self, settings: Settings) -> Image.Image:
        return await load_image_url(
            self.url,
            image_limits(settings),
            settings.allowed_image_hosts,
            settings.image_fetch_timeout_s,
            self.param,
            allow_internal=settings.allow_internal_image_hosts,
        )


@dataclass(frozen=True)
class ImageBytes:
    """Encoded image bytes (an uploaded file, or base64 already decoded)."""

    data: bytes
    param: str

    async def load(self, settings: Settings) -> Image.Image:
        return await decode_image(self.data, image_limits(settings), self.param)


@dataclass(frozen=True)
class RequestSpec:
    """What one HTTP request asks the engine for. `messages` use `{"type": "image"}` parts, filled by `images` in
    order; `id_prefix` starts the request id ("chatcmpl", "cap")."""

    id_prefix: str
    messages: list[dict[str, Any]]
    images: list[ImageSource]
    knobs: Knobs
    sampling: Sampling


async def build(spec: RequestSpec, engine: Engine, settings: Settings) -> GenerationRequest:
    """The engine's request: knobs resolved, sampling within the limits, images decoded (in that order)."""
    alignment = resolve_knobs(spec.knobs, engine, settings)
    sampling = sampling_params(spec.sampling, settings)
    images = [await source.load(settings) for source in spec.images]
    return GenerationRequest(new_id(spec.id_prefix), spec.messages, images, alignment, sampling)


def resolve_knobs(knobs: Knobs, engine: Engine, settings: Settings) -> AlignmentParams:
    try:
        return resolve_alignment(
            knobs.conservativeness,
            engine.num_layers,
            omega=knobs.omega,
            start_layer=knobs.start_layer,
            kappa=knobs.kappa,
            contrast=knobs.contrast,
            default_conservativeness=settings.default_conservativeness,
            knob_map=engine.knob_map,
        )  # the model's sevi_presets.json, if it has one
    except AlignmentParamError as exc:
        param = exc.param if exc.param == "conservativeness" else knobs.param_prefix + exc.param
        raise APIError(400, str(exc), param=param, code="invalid_alignment") from None


def sampling_params(sampling: Sampling, settings: Settings) -> SamplingParams:
    if sampling.max_tokens is None:
        n = min(settings.default_max_tokens, settings.max_tokens_limit)
    elif sampling.max_tokens > settings.max_tokens_limit:
        raise APIError(
            400,
            f"{sampling.max_tokens_param} must be at most {settings.max_tokens_limit}, got {sampling.max_tokens}",
            param=sampling.max_tokens_param,
            code="invalid_value",
        )
    else:
        n = sampling.max_tokens
    return SamplingParams(
        max_tokens=n,
        temperature=sampling.temperature or 0.0,
        top_p=1.0 if sampling.top_p is None else sampling.top_p,
        seed=sampling.seed,
        stop=sampling.stop,
        presence_penalty=sampling.presence_penalty or 0.0,
        frequency_penalty=sampling.frequency_penalty or 0.0,
        ignore_eos=sampling.ignore_eos,
        top_k=max(0, sampling.top_k or 0),  # vLLM's -1 and 0 both mean every token
        min_p=sampling.min_p or 0.0,
        repetition_penalty=1.0 if sampling.repetition_penalty is None else sampling.repetition_penalty,
        min_tokens=min(sampling.min_tokens, n),
        stop_token_ids=sampling.stop_token_ids,
        skip_special_tokens=sampling.skip_special_tokens,
        include_stop_str_in_output=sampling.include_stop_str_in_output,
    )


def image_limits(settings: Settings) -> ImageLimits:
    return ImageLimits(settings.max_image_bytes, settings.max_image_pixels)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
