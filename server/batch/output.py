"""The JSONL output: one whole line per result, appended and flushed as it completes; resume reads it back.

Crash safety: each record is one `os.write` of a complete line to a file opened with O_APPEND, so after a kill the
file holds whole lines and, at worst, one unfinished last line (a machine that lost power may also leave a tail of
zero bytes). Opening the file for a run cuts such a tail off before appending, so every line stays valid JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from server.batch.config import Level

Key = tuple[str, str]


def key(item_id: str, level: Level | None) -> Key:
    """A result's identity: its input's id and the level it was asked at (resume skips keys already written)."""
    return item_id, json.dumps(level)


def record_key(record: dict[str, Any]) -> Key | None:
    """The key of a record this command wrote (caption records name `id`, OpenAI batch records `custom_id`)."""
    item_id = record.get("custom_id", record.get("id"))
    if item_id is None:
        return None
    return key(str(item_id), record.get("conservativeness"))


def repair(path: Path) -> int:
    """Cut an unfinished last line off `path` (a run killed mid-write); returns the bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    with path.open("rb+") as f:
        end = size
        # Walk back to the last newline; everything after it is an unfinished line.
        block = 1 << 16
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                end = start + i + 1
                break
            end = start
        if end < size:
            f.truncate(end)
    return size - end


def records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSONL output, streamed (lines that are not JSON objects are skipped)."""
    if not path.exists():
        return
    with path.open("rb") as f:
        for raw in f:
            line = raw.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def done_keys(*paths: Path) -> set[Key]:
    found: set[Key] = set()
    for path in paths:
        for rec in records(path):
            k = record_key(rec)
            if k is not None:
                found.add(k)
    return found


class Writer:
    """Appends records to a JSONL file, one `os.write` of a whole line each (flushed: no user-space buffer)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        repair(path)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.written = 0

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:  # a regular file takes it in one call; loop in case of a short write
            n = os.write(self._fd, view)
            view = view[n:]
        self.written += 1

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
