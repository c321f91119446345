"""Turning client bytes into PIL images, within the limits, before any costly decode.

Order of checks: encoded size (cheap) -> header only (`Image.open` is lazy) for format and pixel
count -> full decode. So a 50-kB PNG that claims 100k x 100k pixels is refused without allocating it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import re
import warnings
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from server.errors import APIError
from server.url_safety import UnsafeAddress, checked_address

log = logging.getLogger("sevi.server.images")

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MEDIA_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp"}
_DATA_URI = re.compile(
    r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.IGNORECASE
)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


def decode_base64(text: str, limits: ImageLimits, param: str) -> bytes:
    """A data URI or bare base64 string -> bytes, refusing oversize input before decoding it."""
    text = text.strip()
    if text[:5].lower() == "data:":
        m = _DATA_URI.match(text)
        if m is None or not m.group("b64"):
            raise APIError(
                400, "image data URI must be base64: data:image/png;base64,...", param=param, code="invalid_image"
            )
        media = (m.group("type") or "").lower()
        if media not in MEDIA_TYPES:
            raise APIError(
                415,
                f"unsupported image type {media or '(none)'}; use one of {sorted(MEDIA_TYPES)}",
                param=param,
                code="unsupported_image",
            )
        text = text[m.end() :]
    # 4 base64 characters carry 3 bytes: refuse by length before allocating the decoded copy.
    if len(text) * 3 // 4 > limits.max_bytes + 3:
        raise APIError(413, f"image is larger than {limits.max_bytes} bytes", param=param, code="image_too_large")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image is not valid base64", param=param, code="invalid_image") from None
    return data


def open_image(data: bytes, limits: ImageLimits, param: str) -> Image.Image:
    """Bytes -> decoded RGB image, or 413 (too big) / 415 (not a supported, intact image)."""
    if len(data) > limits.max_bytes:
        raise APIError(413, f"image is larger than {limits.max_bytes} bytes", param=param, code="image_too_large")
    if not data:
        raise APIError(415, "image is empty", param=param, code="unsupported_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
            w, h = img.size
            if w <= 0 or h <= 0:
                raise APIError(415, "image has no pixels", param=param, code="unsupported_image")
            if w * h > limits.max_pixels:
                raise APIError(
                    413,
                    f"image of {w}x{h} pixels is over the limit of {limits.max_pixels} pixels",
                    param=param,
                    code="image_too_large",
                )
            img.seek(0)  # animated images: the first frame
            img.load()
            return img.convert("RGB")
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(413, "image is over the pixel limit", param=param, code="image_too_large") from None
    except UnidentifiedImageError:
        raise APIError(
            415, f"not a supported image; use one of {', '.join(FORMATS)}", param=param, code="unsupported_image"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise APIError(415, f"image could not be decoded: {exc}", param=param, code="unsupported_image") from None


def host_allowed(url: str, allowed: list[str]) -> bool:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.hostname.lower()
    with_port = f"{host}:{parts.port}" if parts.port else host
    names = {a.strip().lower() for a in allowed}
    return host in names or with_port in names


async def pinned_request(
    url: str, allow_internal: bool, param: str
) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
    """The URL to GET (its host replaced by the address that was checked), the Host header and the TLS server name
    that keep the original name: one resolution, so DNS cannot answer the check and the connection differently."""
    target = httpx.URL(url)
    host = target.host
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        address = await checked_address(host, port, allow_internal)
    except UnsafeAddress as exc:
        log.warning("image URL refused", extra={"fields": {"host": host, "reason": str(exc)}})
        raise APIError(
            400,
            f"{exc}; internal addresses are refused unless the server sets allow_internal_image_hosts",
            param=param,
            code="image_url_forbidden",
        ) from None
    headers = {"Host": target.netloc.decode("ascii")}
    extensions = {"sni_hostname": host} if target.scheme == "https" else {}
    return target.copy_with(host=address), headers, extensions


async def fetch_image_bytes(
    url: str, limits: ImageLimits, allowed: list[str], timeout_s: float, param: str, allow_internal: bool = False
) -> bytes:
    """GET an allow-listed http(s) URL with a byte cap: only a public address (`url_safety`), the one checked, and
    no redirects (they could leave the allow-list)."""
    if not host_allowed(url, allowed):
        raise APIError(
            400,
            "image_url must be a data URI (data:image/...;base64,...); http(s) URLs are accepted only "
            "for hosts in the server's allowed_image_hosts setting",
            param=param,
            code="invalid_image_url",
        )
    target, headers, extensions = await pinned_request(url, allow_internal, param)
    try:
        # trust_env=False: an HTTP(S)_PROXY from the environment would resolve the name again, out of our sight.
        async with (
            httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False) as client,
            client.stream("GET", target, headers=headers, extensions=extensions) as resp,
        ):
            if resp.status_code != 200:
                raise APIError(
                    400, f"fetching the image gave HTTP {resp.status_code}", param=param, code="image_fetch_failed"
                )
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                raise APIError(
                    413, f"image is larger than {limits.max_bytes} bytes", param=param, code="image_too_large"
                )
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > limits.max_bytes:
                    raise APIError(
                        413, f"image is larger than {limits.max_bytes} bytes", param=param, code="image_too_large"
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise APIError(
            400, f"could not fetch the image: {type(exc).__name__}", param=param, code="image_fetch_failed"
        ) from None


async def load_image_url(
    url: str, limits: ImageLimits, allowed: list[str], timeout_s: float, param: str, allow_internal: bool = False
) -> Image.Image:
    """An OpenAI `image_url.url` (data URI, or allow-listed http(s)) -> decoded image; decoding off the event loop."""
    if url[:5].lower() == "data:":
        data = decode_base64(url, limits, param)
    elif url[:7].lower() == "http://" or url[:8].lower() == "https://":
        data = await fetch_image_bytes(url, limits, allowed, timeout_s, param, allow_internal)
    else:
        raise APIError(
            400,
            "image_url.url must be a data URI (data:image/png;base64,...) or an http(s) URL",
            param=param,
            code="invalid_image_url",
        )
    return await decode_image(data, limits, param)


# Below this size decoding takes well under a millisecond: cheaper on the event loop than a thread hop,
# which needs the GIL back twice from a busy engine thread.
INLINE_DECODE_BYTES = 256 * 1024


async def decode_image(data: bytes, limits: ImageLimits, param: str) -> Image.Image:
    """`open_image`, in a worker thread for large inputs so the event loop keeps serving."""
    if len(data) <= INLINE_DECODE_BYTES:
        return open_image(data, limits, param)
    return await asyncio.to_thread(open_image, data, limits, param)
