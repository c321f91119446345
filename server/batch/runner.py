"""The batch job's core: items in, one engine, results out, the engine kept full.

Flow control: at most `window` engine rows are in flight (a request with contrastive decoding takes two, one without
it one), counting requests whose image is being read and decoded in the preprocessing pool and those in the engine.
The window is twice the engine's rows (four times its batch limit, which counts two-row requests), so while one full
batch decodes, the next is decoded and waiting; the engine's own scheduler (continuous batching) takes each waiting
request as a slot frees. (More waiting than that was slower: at c = 0.5 the HTTP API gave 2.26 images/s with 16
clients and 1.80 with 32, bench/batch_caption.py.) Input is pulled only when slots free, so memory holds at most
`window` decoded images whatever the collection's size.

Each result is written (one whole line) as it completes; an item's failure (4xx: a bad image, field or level)
becomes a record in the API's error format and the job goes on. A failure that is the engine's (5xx) writes no line,
so that the rerun which resumes the job retries it; an engine that stopped serving (503) stops the job.
Pairs already in the output (`done`) are skipped: that is how a rerun resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from server.batch import records
from server.batch.config import BatchSettings, Level
from server.batch.inputs import Item
from server.batch.output import Key, Writer, key
from server.batch.prepare import caption_request, chat_request, levels_for, load_image
from server.batch.progress import Progress
from server.errors import APIError, from_exception
from server.service import Outcome
from sevi.engines.api import Engine, EngineOverloaded, GenerationRequest, GenerationStats, TokenEvent
from sevi.method.knob import AlignmentParamError, parse_conservativeness
from sevi.method.telemetry import Telemetry

log = logging.getLogger("sevi.batch")

OVERLOADED_RETRY_S = 0.05


class EngineUnavailable(RuntimeError):
    """The engine stopped serving mid-job (503: it died or is shutting down); rerun the command to resume."""


@dataclass
class RunCounts:
    results: int = 0
    failures: int = 0
    skipped: int = 0  # (item, level) pairs already in the output
    images: int = 0  # items with at least one result this run
    tokens: int = 0  # completion tokens
    unwritten: int = 0  # ended by the engine's fault (500, 504): no line, so a rerun retries them
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(self).items()}


async def complete(engine: Engine, request: GenerationRequest, timeout_s: float) -> tuple[Outcome, GenerationStats]:
    """Run one request to its end through the public engine API (token events), as the API's `Run.collect` does."""
    while True:
        stats = GenerationStats()
        parts: list[str] = []
        last: TokenEvent | None = None
        try:
            events = engine.generate(request, stats)
            try:
                async with asyncio.timeout(timeout_s):
                    async for ev in events:
                        parts.append(ev.text)
                        last = ev
            finally:
                aclose = getattr(events, "aclose", None)  # leaving early cancels the request in the engine
                if aclose is not None:
                    await aclose()
        except EngineOverloaded:
            # Only before the first event; the window keeps under the queue bound, so this is a rare race.
            await asyncio.sleep(OVERLOADED_RETRY_S)
            continue
        if last is None:
            raise APIError(
                500, "the engine ended the request without a result", code="engine_error", type="server_error"
            )
        outcome = Outcome(
            "".join(parts),
            last.finish_reason,
            last.prompt_tokens,
            last.completion_tokens,
            last.telemetry or Telemetry(),
        )
        return outcome, stats


def default_window(engine: Engine, settings: BatchSettings, levels: int) -> int:
    """The window in rows (a request with contrastive decoding is two, one without it one): twice the engine's rows,
    i.e. four times its batch limit, which counts requests of two rows. At least every row of one item."""
    if settings.max_in_flight is not None:
        return max(settings.max_in_flight, 2 * levels)
    limit = engine.batch_limit or settings.max_batch_size or 8
    return max(4 * limit, 2 * levels)


def rows(item: Item, level: Level | None, engine: Engine, default: float) -> int:
    """The engine rows a request will take: 2 with contrastive decoding (its contrast row), else 1; read from the
    level and the item's fields as the knob resolution will (a value it refuses counts 1: it never runs)."""
    fields = item.body if item.body is not None else item.fields
    asked = level if level is not None else fields.get("conservativeness")
    explicit = (fields.get("alignment") or {}).get("contrast") if item.is_chat else fields.get("contrast")
    try:
        c = parse_conservativeness(asked, default, engine.knob_map.names)
    except (AlignmentParamError, TypeError, ValueError):
        return 1
    # The knob's contrast rule (sevi.method.knob), not a resolution: the request is resolved once, at intake.
    return 2 if engine.knob_map.contrast_for(c, explicit if isinstance(explicit, bool) else None) else 1


class Captioner:
    """Items through one started engine into one writer. `run` may be called concurrently (the Ray actor does):
    the window is shared, so the engine stays full across calls."""

    def __init__(
        self,
        engine: Engine,
        settings: BatchSettings,
        writer: Writer,
        done: set[Key],
        pool: Executor,
        window: int,
        progress: Progress | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.levels = settings.level_list()
        self.writer = writer
        self.done = done
        self.pool = pool
        self.window = window
        self.progress = progress
        self.counts = RunCounts()
        self.stopped: APIError | None = None  # the engine became unavailable: the job stops (resumable)
        self._slots = asyncio.Semaphore(window)

    def pending(self, items: Iterable[Item]) -> Iterator[tuple[Item, list[Level | None]]]:
        """Each item with its levels not yet in the output (items with none left are passed over)."""
        for item in items:
            pairs: list[Level | None] = []
            for level in levels_for(item, self.levels, self.settings.default_conservativeness):
                k = key(item.id, level)
                if k in self.done:
                    self.counts.skipped += 1
                    continue
                self.done.add(k)  # a duplicate id later in the input is skipped, not run twice
                pairs.append(level)
            if pairs:
                yield item, pairs

    async def run(self, items: Iterable[Item]) -> RunCounts:
        return await self.run_pending(self.pending(items))

    async def run_pending(self, work: Iterable[tuple[Item, list[Level | None]]]) -> RunCounts:
        """Items with the levels to run each at (see `pending`), through the engine within the window."""
        t0 = time.perf_counter()
        mine = RunCounts()  # this call's share (the Ray actor runs several calls at once)
        tasks: set[asyncio.Task[None]] = set()
        default = self.settings.default_conservativeness
        for item, pairs in work:
            weights = [rows(item, level, self.engine, default) for level in pairs]
            for _ in range(sum(weights)):
                await self._slots.acquire()
            if self.stopped is not None:
                for _ in range(sum(weights)):
                    self._slots.release()
                break
            task = asyncio.create_task(self._item(item, list(zip(pairs, weights, strict=True)), mine))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        if self.stopped is not None:
            raise EngineUnavailable(self.stopped.message)
        mine.seconds = time.perf_counter() - t0
        mine.skipped = self.counts.skipped
        self.counts.seconds += mine.seconds
        return mine

    async def _item(self, item: Item, pairs: list[tuple[Level | None, int]], mine: RunCounts) -> None:
        image: asyncio.Task[Image.Image] | None = None
        load_ms: list[float] = [0.0]
        if item.error is None and not item.is_chat:

            async def timed_load() -> Image.Image:
                t = time.perf_counter()
                try:
                    return await load_image(item, self.settings, self.pool)
                finally:
                    load_ms[0] = (time.perf_counter() - t) * 1000

            image = asyncio.create_task(timed_load())
        try:
            ok = await asyncio.gather(*(self._pair(item, lv, w, image, load_ms, mine) for lv, w in pairs))
            if any(ok):
                self.counts.images += 1
                mine.images += 1
        finally:
            if image is not None:
                if not image.done():
                    image.cancel()
                with contextlib.suppress(BaseException):
                    await image  # retrieve its exception (every pair may have failed before needing it)

    async def _pair(
        self,
        item: Item,
        level: Level | None,
        weight: int,
        image: asyncio.Task[Image.Image] | None,
        load_ms: list[float],
        mine: RunCounts,
    ) -> bool:
        t0 = time.perf_counter()
        timings = records.Timings()
        try:
            try:
                if item.error is not None:
                    raise item.error
                if item.is_chat:
                    request = await chat_request(item, level, self.engine, self.settings)
                    timings.preprocess_ms = (time.perf_counter() - t0) * 1000
                else:
                    assert image is not None
                    request = await caption_request(item, level, image, self.engine, self.settings)
                    timings.preprocess_ms = load_ms[0]
                outcome, stats = await complete(self.engine, request, self.settings.request_timeout_s)
                timings.queue_ms = stats.queue_s * 1000
                timings.engine_ms = stats.engine_s * 1000
                timings.total_ms = (time.perf_counter() - t0) * 1000
                model = self.engine.model_name
                make = records.chat_ok if item.is_chat else records.caption_ok
                self._write(
                    mine, make(item.id, level, request, outcome, model, timings), tokens=outcome.completion_tokens
                )
                return True
            except Exception as exc:  # noqa: BLE001 - any failure is this item's record; the job goes on
                err = from_exception(exc, self.settings.retry_after_s)
                fields = {"id": item.id, "conservativeness": level, "status": err.status, "error": err.message[:300]}
                if err.status >= 500:
                    # Not the item's fault: no line, so the rerun that resumes the job retries it. An engine that is
                    # gone (503) stops the job, rather than writing off every item after it.
                    log.error("item not done: engine failure", extra={"fields": fields}, exc_info=exc)
                    if err.status == 503 and self.stopped is None:
                        self.stopped = err
                    for counts in (self.counts, mine):
                        counts.unwritten += 1
                    return False
                log.warning("item failed", extra={"fields": fields})
                timings.total_ms = (time.perf_counter() - t0) * 1000
                if not item.is_chat:
                    timings.preprocess_ms = load_ms[0]
                make_failed = records.chat_failed if item.is_chat else records.caption_failed
                self._write(mine, make_failed(item.id, level, err, timings), failed=True)
                return False
        finally:
            for _ in range(weight):
                self._slots.release()

    def _write(self, mine: RunCounts, record: dict[str, Any], failed: bool = False, tokens: int = 0) -> None:
        record["timings"]["completed_at"] = round(time.time(), 3)
        self.writer.write(record)
        for counts in (self.counts, mine):
            counts.results += 1
            counts.failures += int(failed)
            counts.tokens += tokens
        if self.progress is not None:
            self.progress.update(1, failed=int(failed), tokens=tokens)
