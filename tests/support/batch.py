"""Shared by the batch command's tests: collections on disk, settings like a live server's, results by key."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from server.batch.config import BatchSettings
from server.batch.job import run_local
from server.settings import Settings
from sevi.engines.api import Engine
from tests.support.images import png_bytes


def image_folder(root: Path, n: int, seed0: int = 100, bad: bool = True) -> Path:
    """`n` PNGs of distinct random images (some in a subfolder) and, with `bad`, a file that is not an image."""
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / ("sub" if i % 3 == 2 else ".") / f"img{i:03d}.png").write_bytes(png_bytes(seed0 + i))
    if bad:
        (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    return root


def batch_settings(base: Settings, **job: Any) -> BatchSettings:
    """The batch command's settings with a server's engine settings (so their answers can be compared)."""
    values = base.model_dump()
    values.update(progress="off")
    values.update(job)
    return BatchSettings(**values)


def run_in_process(settings: BatchSettings, engine: Engine | None = None) -> dict[str, Any]:
    return asyncio.run(run_local(settings, engine=engine))


def by_key(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Output records by (input id, level asked); fails on a duplicate."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        k = (str(rec.get("custom_id", rec.get("id"))), json.dumps(rec.get("conservativeness")))
        assert k not in out, f"duplicate result for {k}"
        out[k] = rec
    return out


def api_caption(client: httpx.Client, png: bytes, level: float | str, **fields: Any) -> dict[str, Any]:
    data = {"conservativeness": str(level), **{k: str(v) for k, v in fields.items()}}
    r = client.post("/caption", files={"image": ("x.png", png, "image/png")}, data=data)
    assert r.status_code == 200, r.text
    return dict(r.json())
