"""`POST /caption`: an image (multipart file, or JSON base64/data URI) -> a caption, with the applied alignment.

The body is parsed here rather than by FastAPI because one operation takes two media types; OpenAPI
still describes both (see `schemas.caption.request_body_openapi`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from server.deps import ArrivalDep, EngineDep, MetricsDep, SettingsDep, require_api_key
from server.errors import APIError
from server.images import decode_base64
from server.intake import ImageBytes, Knobs, RequestSpec, Sampling, build, image_limits
from server.schemas.caption import CaptionJSON, CaptionParams, CaptionResponse, request_body_openapi
from server.schemas.common import AppliedAlignment, Telemetry, Usage
from server.service import Run
from server.settings import Settings
from sevi.engines.api import user_message

router = APIRouter(tags=["sevi"], dependencies=[Depends(require_api_key)])

_FORM_FIELDS = set(CaptionParams.model_fields)


@router.post(
    "/caption",
    response_model=CaptionResponse,
    openapi_extra=request_body_openapi(),
    summary="Caption one image.",
    description="multipart/form-data with an `image` file, or application/json with `image` as base64 or "
    "a data URI. `x-engine-time-ms` tells the engine's own time for the request.",
)
async def caption(
    request: Request,
    response: Response,
    engine: EngineDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    arrival: ArrivalDep,
) -> CaptionResponse | Response:
    params, image_bytes = await _parse(request, settings)
    spec = RequestSpec(
        "cap",
        user_message(params.prompt, 1),
        [ImageBytes(image_bytes, "image")],
        Knobs(params.conservativeness, params.omega, params.start_layer, params.kappa, params.contrast),
        Sampling(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, seed=params.seed),
    )
    generation = await build(spec, engine, settings)
    run = Run(arrival, request.receive, engine, metrics, settings, "/caption", generation)
    await run.start()
    outcome = await run.collect()
    if outcome is None:
        return Response(status_code=499)  # client gone: nobody reads this
    response.headers.update(run.timing_headers())
    return CaptionResponse(
        id=generation.request_id,
        created=int(time.time()),
        model=engine.model_name,
        caption=outcome.text,
        finish_reason=outcome.finish_reason,
        usage=Usage.of(outcome.prompt_tokens, outcome.completion_tokens),
        alignment=AppliedAlignment.model_validate(generation.alignment),
        telemetry=Telemetry.of(outcome.telemetry),
    )


async def _parse(request: Request, settings: Settings) -> tuple[CaptionParams, bytes]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _parse_form(request, settings)
    if ctype == "application/json":
        return await _parse_json(request, settings)
    raise APIError(
        415,
        "send multipart/form-data (an `image` file) or application/json (`image` as base64 or a data URI)",
        code="unsupported_media_type",
    )


async def _parse_json(request: Request, settings: Settings) -> tuple[CaptionParams, bytes]:
    try:
        raw: Any = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    if isinstance(raw, dict) and not isinstance(raw.get("image"), str):
        raise APIError(
            400, "an image is required: `image` as base64 or a data URI", param="image", code="missing_image"
        )
    unknown = sorted(set(raw) - _FORM_FIELDS - {"image"}) if isinstance(raw, dict) else []
    if unknown:  # a misspelt knob must not fall back to the default in silence (as in the form and the chat API)
        raise APIError(400, f"unknown field(s): {', '.join(unknown)}", param=unknown[0], code="invalid_value")
    body = _validate(CaptionJSON, raw)
    data = decode_base64(body.image, image_limits(settings), "image")
    return CaptionParams.model_validate(body.model_dump(exclude={"image"})), data


async def _parse_form(request: Request, settings: Settings) -> tuple[CaptionParams, bytes]:
    try:
        form = await request.form(max_files=2, max_fields=len(_FORM_FIELDS) + 4, max_part_size=64 * 1024)
    except Exception as exc:  # starlette raises MultiPartException (and others) for malformed bodies
        raise APIError(400, f"malformed multipart body: {exc}", code="invalid_multipart") from None
    try:
        image = form.get("image")
        fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
        unknown = sorted(set(fields) - _FORM_FIELDS)
        if unknown:
            raise APIError(400, f"unknown form field(s): {', '.join(unknown)}", param=unknown[0], code="invalid_value")
        params = _validate(CaptionParams, fields)
        if isinstance(image, UploadFile):
            if image.size is not None and image.size > settings.max_image_bytes:
                raise APIError(
                    413, f"image is larger than {settings.max_image_bytes} bytes", param="image", code="image_too_large"
                )
            data = await image.read(settings.max_image_bytes + 1)
        elif isinstance(image, str) and image:
            data = decode_base64(image, image_limits(settings), "image")
        else:
            raise APIError(400, "an image is required: an `image` file part", param="image", code="missing_image")
        return params, data
    finally:
        await form.close()


def _validate(model: type[CaptionParams], raw: Any) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        # The app's handler turns these into 400s in the OpenAI error format.
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
