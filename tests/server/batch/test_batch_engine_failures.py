"""The batch runner against a stub engine (no model): an engine failure writes no line (the rerun retries it), an
engine that stops serving stops the job, and the rerun finishes with one line per item."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.batch.job import run_local
from server.batch.runner import EngineUnavailable
from server.settings import Settings
from sevi.engines.api import (
    Engine,
    EngineError,
    EngineNotReady,
    EngineStats,
    GenerationRequest,
    GenerationStats,
    TokenEvent,
)
from tests.support.batch import batch_settings, by_key
from tests.support.images import png_bytes


class StubEngine(Engine):
    """Captions an image with its width; fails images of the widths it is told to."""

    def __init__(self, fail: dict[int, BaseException]) -> None:
        self.fail = fail
        self._model_name = "stub"
        self.seen: list[int] = []

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        raise NotImplementedError

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    @property
    def num_layers(self) -> int:
        return 4

    @property
    def batch_limit(self) -> int | None:
        return 2

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0)

    async def generate(
        self, request: GenerationRequest, stats: GenerationStats | None = None
    ) -> AsyncIterator[TokenEvent]:
        width = request.images[0].size[0]
        self.seen.append(width)
        await asyncio.sleep(0)
        if width in self.fail:
            raise self.fail[width]
        yield TokenEvent(request.request_id, 1, f"w{width}", "stop", 3, 1)


def folder(tmp_path: Path, widths: list[int]) -> Path:
    root = tmp_path / "pics"
    root.mkdir()
    for i, w in enumerate(widths):
        (root / f"{i:02d}.png").write_bytes(png_bytes(i, size=(w, 20)))
    return root


def test_an_engine_error_writes_no_line_and_the_rerun_retries_it(tmp_path: Path) -> None:
    pics = folder(tmp_path, [21, 22, 23, 24])
    out = tmp_path / "out.jsonl"
    settings = batch_settings(Settings(model=tmp_path), input=pics, output=out, levels="0,1")
    summary = asyncio.run(run_local(settings, engine=StubEngine({23: EngineError("step failed")})))
    assert summary["this_run"]["unwritten"] == 2 and summary["failures"] == 0
    assert {k[0] for k in by_key(out)} == {"00.png", "01.png", "03.png"}
    again = StubEngine({})
    summary = asyncio.run(run_local(settings, engine=again))
    assert again.seen == [23, 23] and summary["this_run"]["skipped"] == 6
    got = by_key(out)
    assert len(got) == 8 and got[("02.png", "1.0")]["caption"] == "w23"


def test_an_engine_that_stops_serving_stops_the_job(tmp_path: Path) -> None:
    pics = folder(tmp_path, [31, 32, 33, 34, 35, 36, 37, 38])
    out = tmp_path / "out.jsonl"
    settings = batch_settings(Settings(model=tmp_path), input=pics, output=out, max_in_flight=1)
    with pytest.raises(EngineUnavailable, match="gone"):
        asyncio.run(run_local(settings, engine=StubEngine({33: EngineNotReady("gone")})))
    written = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert written == ["00.png", "01.png"]  # nothing after the engine went: no failure lines to skip later
    asyncio.run(run_local(settings, engine=StubEngine({})))
    assert len(by_key(out)) == 8
