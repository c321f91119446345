"""The three inputs of the batch command, streamed item by item (never loaded whole), told apart by content.

- a folder: every image file under it (recursive, in sorted order); an item's id is its path relative to the folder;
- a JSONL manifest: `{"id": ..., "image": path | data URI | http(s) URL, "prompt"?, "conservativeness"?, ...}` per
  line, with the /caption API's fields (relative paths are read from the manifest's folder);
- an OpenAI batch file: `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}` per line,
  the format of OpenAI's Batch API and of vLLM's `run-batch`.

A line that cannot be read becomes an item that carries its error (the job reports it and goes on); only an input
that is none of the three stops the job before it starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from server.errors import APIError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})
Kind = Literal["folder", "manifest", "openai"]
CHAT_URL = "/v1/chat/completions"


@dataclass(frozen=True)
class Item:
    """One input: an image to caption (folder, manifest) or one chat request (OpenAI batch)."""

    id: str
    image: str | None = None  # a file path, a data URI or an http(s) URL
    fields: dict[str, Any] = field(default_factory=dict)  # the manifest line's /caption fields
    body: dict[str, Any] | None = None  # an OpenAI batch line's request body
    error: APIError | None = None  # a line that could not be read: reported as this item's result

    @property
    def is_chat(self) -> bool:
        return self.body is not None


class InputError(ValueError):
    """The input is none of the three kinds (stops the job before it starts)."""


def detect(path: Path) -> Kind:
    """A folder, else by the first non-empty line: an object with `custom_id` and `body` is an OpenAI batch file."""
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise InputError(f"{path}: no such file or folder")
    with path.open("rb") as f:
        for raw in f:
            line = raw.strip()
            if not line:
                continue
            try:
                first = json.loads(line)
            except ValueError:
                raise InputError(
                    f"{path}: the first line is not JSON (want a folder, a JSONL manifest or an OpenAI batch file)"
                ) from None
            if not isinstance(first, dict):
                raise InputError(f"{path}: the first line is not a JSON object")
            return "openai" if "custom_id" in first and "body" in first else "manifest"
    raise InputError(f"{path}: the file is empty")


def read(path: Path, kind: Kind | None = None) -> Iterator[Item]:
    kind = kind or detect(path)
    if kind == "folder":
        return _folder(path)
    if kind == "openai":
        return _openai(path)
    return _manifest(path)


def count(path: Path, kind: Kind) -> int:
    """Items in the input (one streaming pass, for the progress bar's total)."""
    if kind == "folder":
        return sum(1 for _ in _walk(path))
    with path.open("rb") as f:
        return sum(1 for raw in f if raw.strip())


def _walk(root: Path) -> Iterator[Path]:
    """Image files under `root`, depth first in sorted order; one folder's listing at a time in memory."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path))
        elif entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
            yield Path(entry.path)


def _folder(root: Path) -> Iterator[Item]:
    for p in _walk(root):
        yield Item(id=p.relative_to(root).as_posix(), image=str(p))


def _lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed JSON or an APIError) for each non-empty line."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            try:
                yield n, json.loads(line)
            except (ValueError, UnicodeDecodeError):
                yield n, APIError(400, f"line {n} is not valid JSON", code="invalid_json")


def _manifest(path: Path) -> Iterator[Item]:
    base = path.parent
    for n, obj in _lines(path):
        if isinstance(obj, APIError):
            yield Item(id=f"line-{n}", error=obj)
            continue
        if not isinstance(obj, dict):
            yield Item(id=f"line-{n}", error=APIError(400, f"line {n} is not a JSON object", code="invalid_json"))
            continue
        fields = dict(obj)
        raw_id = fields.pop("id", None)
        image = fields.pop("image", None)
        item_id = str(raw_id) if raw_id is not None else (image if _is_path(image) else f"line-{n}")
        if not isinstance(image, str) or not image:
            err = APIError(
                400, "an image is required: `image` as a path, data URI or URL", param="image", code="missing_image"
            )
            yield Item(id=item_id, error=err)
            continue
        if _is_path(image):
            image = str(base / image)
        yield Item(id=item_id, image=image, fields=fields)


def _openai(path: Path) -> Iterator[Item]:
    for n, obj in _lines(path):
        if isinstance(obj, APIError):
            yield Item(id=f"line-{n}", error=obj)
            continue
        custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
        item_id = str(custom_id) if custom_id is not None else f"line-{n}"
        if not isinstance(obj, dict) or not isinstance(obj.get("body"), dict) or custom_id is None:
            err = APIError(
                400,
                f"line {n}: a batch request needs custom_id, method, url and an object body",
                code="invalid_request",
            )
            yield Item(id=item_id, error=err)
            continue
        if str(obj.get("method", "POST")).upper() != "POST" or obj.get("url") != CHAT_URL:
            err = APIError(
                400,
                f"only POST {CHAT_URL} is supported in a batch, got {obj.get('method')} {obj.get('url')}",
                param="url",
                code="unsupported_endpoint",
            )
            yield Item(id=item_id, error=err)
            continue
        yield Item(id=item_id, body=obj["body"])


def _is_path(image: object) -> bool:
    if not isinstance(image, str):
        return False
    low = image[:8].lower()
    return not (low.startswith("data:") or low.startswith("http://") or low.startswith("https://"))


def item_to_dict(item: Item) -> dict[str, Any]:
    """An item as JSON (the Ray path hands items to its actors as lines of a file)."""
    out: dict[str, Any] = {"id": item.id}
    if item.image is not None:
        out["image"] = item.image
    if item.fields:
        out["fields"] = item.fields
    if item.body is not None:
        out["body"] = item.body
    if item.error is not None:
        e = item.error
        out["error"] = {"status": e.status, "message": e.message, "param": e.param, "code": e.code, "type": e.type}
    return out


def item_from_dict(d: dict[str, Any]) -> Item:
    err = d.get("error")
    error = None
    if err is not None:
        error = APIError(
            err["status"], err["message"], param=err.get("param"), code=err.get("code"), type=err.get("type")
        )
    return Item(id=d["id"], image=d.get("image"), fields=d.get("fields") or {}, body=d.get("body"), error=error)
