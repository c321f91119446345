"""A whole batch job in one process: start the engine, stream the input through the `Captioner`, summarize."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.batch import inputs
from server.batch.config import BatchSettings
from server.batch.output import Writer, done_keys
from server.batch.prepare import check_levels
from server.batch.progress import Progress
from server.batch.runner import Captioner, RunCounts, default_window
from server.batch.summary import summarize
from sevi.engines import create_engine
from sevi.engines.api import Engine

log = logging.getLogger("sevi.batch")


class LoadError(RuntimeError):
    """The engine failed to load its model."""


async def wait_ready(engine: Engine, timeout_s: float = 1800.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not engine.ready:
        if engine.load_error is not None:
            raise LoadError(engine.load_error)
        if time.monotonic() > deadline:
            raise LoadError(f"the model did not load within {timeout_s:.0f} s")
        await asyncio.sleep(0.05)


def expected_results(settings: BatchSettings, kind: inputs.Kind, done: int) -> int | None:
    """The progress bar's total: items x levels less what is done (items with their own level make it an upper
    bound)."""
    levels = settings.level_list()
    n = inputs.count(settings.input, kind) * (len(levels) if levels else 1)
    return max(0, n - done)


async def run_local(settings: BatchSettings, engine: Engine | None = None) -> dict[str, Any]:
    """The job in this process (an engine may be passed in: tests, benchmarks); returns the summary."""
    kind = inputs.detect(settings.input)
    engine = engine or create_engine(settings)
    levels = settings.level_list()
    if levels:
        check_levels(levels, engine)
    writer = Writer(settings.output)  # cuts an unfinished last line left by a killed run
    done = done_keys(settings.output)
    progress = None
    if settings.progress != "off":
        progress = Progress(expected_results(settings, kind, len(done)), settings.progress, settings.log_every_s)
    started_here = not engine.ready
    if started_here:
        await engine.start()
    pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="sevi-batch-decode")
    try:
        await wait_ready(engine)
        window = default_window(engine, settings, len(levels or [0.0]))
        log.info(
            "batch started",
            extra={
                "fields": {
                    "input": str(settings.input),
                    "kind": kind,
                    "output": str(settings.output),
                    "already_done": len(done),
                    "window": window,
                    "levels": levels,
                }
            },
        )
        captioner = Captioner(engine, settings, writer, done, pool, window, progress)
        counts: RunCounts = await captioner.run(inputs.read(settings.input, kind))
    finally:
        if progress is not None:
            progress.close()
        writer.close()
        pool.shutdown(wait=False, cancel_futures=True)
        if started_here:
            await engine.stop()
    return summarize(settings.output, counts.as_dict())
