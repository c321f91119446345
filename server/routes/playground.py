"""`GET /playground`: the page that compares captions across conservativeness levels; `GET /` sends browsers there.

The page, its settings and its vocabulary need no API key (they hold nothing private, and the page must
load before it can ask for one); the captions it requests go through the keyed endpoints like any client's.
Every response of the page forbids requests to other origins (Content-Security-Policy): the machines that
serve it may have no internet, and a caption tool has no business calling out.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from server.deps import EngineDep, SettingsDep
from server.errors import APIError
from server.playground import STATIC_DIR
from server.playground.vocabulary import vocabulary_json
from server.schemas.caption import DEFAULT_PROMPT

router = APIRouter(include_in_schema=False)

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
}


@cache
def _assets() -> dict[str, Path]:
    """URL path -> file, for every file under static/: requests name one of these or get a 404, so no path
    a client sends is ever joined onto the file system."""
    return {
        p.relative_to(STATIC_DIR).as_posix(): p
        for p in sorted(STATIC_DIR.rglob("*"))
        if p.is_file() and p.suffix in _MEDIA_TYPES
    }


@router.get("/")
async def root() -> RedirectResponse:
    # Relative, so that a reverse proxy serving the app under a path prefix keeps its prefix.
    return RedirectResponse("playground", status_code=307)


@router.get("/playground")
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type=_MEDIA_TYPES[".html"], headers=_PAGE_HEADERS)


@router.get("/playground/assets/{path:path}")
async def asset(path: str) -> FileResponse:
    file = _assets().get(path)
    if file is None:
        raise APIError(404, f"no playground asset {path!r}", code="not_found")
    return FileResponse(file, media_type=_MEDIA_TYPES[file.suffix], headers=_PAGE_HEADERS)


@router.get("/playground/config.json")
async def config(settings: SettingsDep, engine: EngineDep) -> JSONResponse:
    """What the page needs to know before its first request: defaults, limits, and whether a key is needed.

    The presets are the served model's (its `sevi_presets.json` may put Balanced elsewhere than 0.5), and the
    page compares them by default: Off, Balanced and Focused, which is 0, 0.5 and 1 on the paper's map.
    """
    presets = engine.knob_map.names
    body: dict[str, Any] = {
        "model": engine.model_name,
        "auth_required": settings.api_key is not None,
        "default_prompt": DEFAULT_PROMPT,
        "default_levels": sorted(set(presets.values())),
        "presets": presets,
        "default_max_tokens": min(settings.default_max_tokens, settings.max_tokens_limit),
        "max_tokens_limit": settings.max_tokens_limit,
        "max_image_bytes": settings.max_image_bytes,
        "max_image_pixels": settings.max_image_pixels,
        "request_timeout_s": settings.request_timeout_s,
    }
    return JSONResponse(body, headers=_PAGE_HEADERS)


@router.get("/playground/vocabulary.json")
async def vocabulary() -> Response:
    return Response(vocabulary_json(), media_type="application/json", headers=_PAGE_HEADERS)
