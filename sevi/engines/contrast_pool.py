"""The pool of unrelated images that contrastive decoding compares against (spec section 3).

The pool is a setting: a folder of images, or (by default) procedurally drawn noise images, which the
training notes measured as a better contrast than other scenes or a blank image. The draw for a request
is reproducible: by the request's seed, or, without one, by a hash of the request's own image bytes.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def noise_images(count: int = 16, size: int = 224, seed: int = 1234) -> list[Image.Image]:
    """Smooth coloured noise at several scales: image-like statistics, no objects."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        cells = 2 ** (1 + i % 5)
        coarse = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        images.append(img)
    return images


class ContrastPool:
    def __init__(self, images: list[Image.Image]) -> None:
        if not images:
            raise ValueError("the contrast pool is empty")
        self.images = [im.convert("RGB") for im in images]

    @classmethod
    def from_folder(cls, folder: str | Path) -> ContrastPool:
        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"no images in contrast pool folder {folder}")
        return cls([Image.open(p) for p in paths])

    @classmethod
    def default(cls) -> ContrastPool:
        return cls(noise_images())

    def draw(self, seed: int | None, image: Image.Image | None = None, k: int = 1) -> list[Image.Image]:
        """k pool images, chosen by `seed`, else by a hash of `image` (same request, same draw)."""
        if seed is None:
            digest = hashlib.sha256(image.tobytes() if image is not None else b"").digest()
            seed = int.from_bytes(digest[:8], "little")
        rng = random.Random(seed)
        return [self.images[rng.randrange(len(self.images))] for _ in range(k)]
