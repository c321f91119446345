"""Test images: random ones by seed, as PNG bytes and data URIs, in chat messages; the long request's image."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image


def random_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def png_bytes(seed: int = 1, size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    random_image(seed, size).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def image_message(text: str = "what do you see", *images: bytes) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_uri(im)}} for im in images]
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


# A greedy request that runs ~750 tokens on the tiny LLaVA before its EOS (found by search): long enough
# to be cancelled mid-way.
LONG_IMAGE_COLOUR = (80, 100, 140)
LONG_PROMPT = "Please describe this image in detail."


def long_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), LONG_IMAGE_COLOUR).save(buf, "PNG")
    return buf.getvalue()
