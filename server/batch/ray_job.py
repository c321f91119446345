"""Scale-out on Ray Data (`--ray [--ray-address ADDR] --workers N`): one engine per actor, JSONL shards, one merged
output; resumable like the single-process job.

The driver streams the input once (`inputs.read`, whatever its kind) into `OUTPUT.ray/work/*.jsonl`: one line per item
with the levels it still needs, so what is already in the output or in a shard is not sent again. Those files are the
Ray dataset (`read_text`, streamed in blocks); `map_batches` hands its batches to an actor pool of `--workers`
actors, each holding one engine and one `Captioner` (the single-process core) and writing each result to its own
shard `OUTPUT.ray/shard-*.jsonl` as it completes. The actor's `__call__` is async so Ray Data runs several batches on
an actor at once: the engine stays full across batch boundaries. At the end the driver appends every shard record
not yet in the output to it (keys dedupe, so a merge cut short is finished by the next run); shards are kept.

On CPUs each actor claims `--cpus-per-worker` cores of its machine (a lock file per core) and binds itself and
vLLM's threads there, so two engines on one machine do not share a core. vLLM's CPU platform refuses Ray as a
tensor-parallel executor, but a single-process engine inside each actor is the supported pattern.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from server.batch import inputs
from server.batch.config import BatchSettings, Level
from server.batch.job import wait_ready
from server.batch.output import Key, Writer, done_keys, key, record_key, records, repair
from server.batch.prepare import check_levels, levels_for
from server.batch.progress import Progress
from server.batch.runner import Captioner, default_window
from server.batch.summary import summarize
from server.logs import setup_logging
from sevi.engines import create_engine
from sevi.runtime import runtime_env

log = logging.getLogger("sevi.batch")


def shard_dir(output: Path) -> Path:
    return output.with_name(output.name + ".ray")


def shards(output: Path) -> list[Path]:
    folder = shard_dir(output)
    return sorted(folder.glob("shard-*.jsonl")) if folder.exists() else []


MAX_WORK_FILES = 1024
_COUNTED = ("results", "failures", "tokens", "images")


def write_items(settings: BatchSettings, done: set[Key], folder: Path) -> tuple[int, int]:
    """The work: one line per item with its pending levels, in files of a Ray batch each (at most MAX_WORK_FILES
    files: larger ones for larger collections). Ray reads a file as one block at least, so the files are what spreads
    the items over the actors. Returns (items, results pending)."""
    import shutil

    levels = settings.level_list()
    per_file = max(
        settings.ray_batch_size, -(-inputs.count(settings.input, inputs.detect(settings.input)) // MAX_WORK_FILES)
    )
    tmp = folder / "work.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lines = pending = 0
    f = None
    try:
        for item in inputs.read(settings.input):
            todo = [
                lv for lv in levels_for(item, levels, settings.default_conservativeness) if key(item.id, lv) not in done
            ]
            for lv in todo:
                done.add(key(item.id, lv))
            if not todo:
                continue
            if lines % per_file == 0:
                if f is not None:
                    f.close()
                f = (tmp / f"items-{lines // per_file:06d}.jsonl").open("w")
            assert f is not None
            f.write(json.dumps({"item": inputs.item_to_dict(item), "levels": todo}) + "\n")
            lines += 1
            pending += len(todo)
    finally:
        if f is not None:
            f.close()
    work = folder / "work"
    shutil.rmtree(work, ignore_errors=True)
    tmp.replace(work)
    return lines, pending


def merge(output: Path) -> int:
    """Append the shards' records that the output lacks; returns how many were appended."""
    have = done_keys(output)
    added = 0
    with Writer(output) as writer:
        for shard in shards(output):
            for rec in records(shard):
                k = record_key(rec)
                if k is None or k in have:
                    continue
                have.add(k)
                writer.write(rec)
                added += 1
    return added


def claim_cores(n: int, job: str) -> tuple[list[int], list[int]]:
    """`n` cores of this machine no other actor of this job holds (lock files, released when the process ends).
    Returns (cores, open lock fds)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    folder = Path(tempfile.gettempdir()) / "sevi-batch-cores"
    folder.mkdir(exist_ok=True)
    cores: list[int] = []
    fds: list[int] = []
    for core in allowed:
        fd = os.open(folder / f"{job}-core-{core}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        cores.append(core)
        fds.append(fd)
        if len(cores) == n:
            break
    return cores, fds


class CaptionActor:
    """One engine in one Ray actor: a private event loop thread runs the engine's consumers and the Captioner."""

    def __init__(self, settings_json: str, job: str) -> None:
        settings = BatchSettings.model_validate_json(settings_json)
        setup_logging(settings.log_level)
        self._cores: list[int] = []
        self._locks: list[int] = []
        if settings.gpus_per_worker == 0 and hasattr(os, "sched_setaffinity"):
            cores, self._locks = claim_cores(max(1, int(settings.cpus_per_worker)), job)
            if cores:
                os.sched_setaffinity(0, cores)
                runtime_env.bind_vllm_cpu_threads(cores)
                self._cores = cores
        threads = settings.torch_threads or max(1, int(settings.cpus_per_worker))
        self.settings = settings.model_copy(update={"torch_threads": threads})
        self.engine = create_engine(self.settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sevi-batch-actor", daemon=True)
        self._thread.start()
        shard = shard_dir(settings.output) / f"shard-{uuid.uuid4().hex[:12]}.jsonl"
        self.writer = Writer(shard)
        self.pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="sevi-batch-decode")
        self.captioner: Captioner | None = None
        self._call(self._start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _start(self) -> None:
        await self.engine.start()
        await wait_ready(self.engine)
        n_levels = len(self.settings.level_list() or [0.0])
        window = default_window(self.engine, self.settings, n_levels)
        self.captioner = Captioner(self.engine, self.settings, self.writer, set(), self.pool, window)
        log.info("ray actor ready", extra={"fields": {"cores": self._cores, "window": window, "pid": os.getpid()}})

    async def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        work: list[tuple[inputs.Item, list[Level | None]]] = []
        for line in batch["text"]:
            row = json.loads(line)
            work.append((inputs.item_from_dict(row["item"]), row["levels"]))
        assert self.captioner is not None
        # Ray Data runs several batches on this actor at once (an async UDF); each runs on the actor's own loop,
        # where the engine's consumers live, and shares the Captioner's window: the engine stays full.
        t0 = time.time()
        future = asyncio.run_coroutine_threadsafe(self.captioner.run_pending(work), self.loop)
        counts = await asyncio.wrap_future(future)
        out = {name: np.array([getattr(counts, name)]) for name in _COUNTED}
        return {**out, "t0": np.array([t0]), "t1": np.array([time.time()])}


def run_ray(settings: BatchSettings) -> dict[str, Any]:
    t_start = time.perf_counter()
    output = settings.output
    folder = shard_dir(output)
    folder.mkdir(parents=True, exist_ok=True)
    repair(output)
    for shard in shards(output):
        repair(shard)
    done = done_keys(output, *shards(output))
    already = len(done)
    n_lines, pending = write_items(settings, done, folder)
    log.info(
        "ray batch: work file written",
        extra={"fields": {"items": n_lines, "results_pending": pending, "already_done": already}},
    )
    ran: dict[str, float] = _run_actors(settings, folder / "work", pending) if pending else dict.fromkeys(_COUNTED, 0)
    added = merge(output)
    seconds = time.perf_counter() - t_start
    log.info("ray batch: shards merged", extra={"fields": {"appended": added, "output": str(output)}})
    # Rates over the captioning span (as the single-process job's exclude its model load); the wall time beside it.
    captioning = ran.pop("captioning_seconds", 0.0)
    counts = {**ran, "skipped": already, "seconds": round(captioning or seconds, 3), "wall_seconds": round(seconds, 3)}
    summary = summarize(output, counts)
    summary["shards"] = [str(p) for p in shards(output)]
    return summary


def _run_actors(settings: BatchSettings, work: Path, pending: int) -> dict[str, float]:
    """The dataset through the actor pool; this run's counts, summed over the batches the actors return."""
    import ray
    import ray.data

    started = False
    if not ray.is_initialized():
        if settings.ray_address:
            ray.init(address=settings.ray_address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False, log_to_driver=True)
        started = True
    try:
        # The model's presets and levels are checked once here, before any actor loads a model.
        levels = settings.level_list()
        if levels:
            check_levels(levels, create_engine(settings))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        # Work goes out once every actor has loaded its engine (the constructor loads it): else the first one up
        # takes the blocks of those still loading.
        ctx.wait_for_min_actors_s = 1800
        job = uuid.uuid4().hex[:12]
        # Reading the work file is light I/O: it takes no core, or it would wait behind the actors holding them all.
        files = len(list(work.glob("*.jsonl")))
        ds = ray.data.read_text(str(work.resolve()), num_cpus=0, override_num_blocks=files)
        ds = ds.map_batches(
            CaptionActor,
            fn_constructor_args=(settings.model_dump_json(), job),
            batch_size=settings.ray_batch_size,
            # Two batches queued per actor: enough to keep its engine full (the batches run at once, async UDF), few
            # enough that the first actor up does not take the work of those still loading their model.
            compute=ray.data.ActorPoolStrategy(size=settings.workers, max_tasks_in_flight_per_actor=2),
            num_cpus=settings.cpus_per_worker,
            num_gpus=settings.gpus_per_worker,
        )
        progress = None if settings.progress == "off" else Progress(pending, settings.progress, settings.log_every_s)
        totals: dict[str, float] = dict.fromkeys(_COUNTED, 0)
        span = [float("inf"), 0.0]  # first batch start, last batch end, over all actors (wall clock)
        try:
            for batch in ds.iter_batches(batch_size=None):
                for name in _COUNTED:
                    totals[name] += int(batch[name].sum())
                span = [min(span[0], float(batch["t0"].min())), max(span[1], float(batch["t1"].max()))]
                if progress is not None:
                    progress.update(
                        int(batch["results"].sum()),
                        failed=int(batch["failures"].sum()),
                        tokens=int(batch["tokens"].sum()),
                    )
        finally:
            if progress is not None:
                progress.close()
        # The captioning alone: from the first batch an actor started to the last one's end (no start-up).
        totals["captioning_seconds"] = round(max(0.0, span[1] - span[0]), 3)
        return totals
    finally:
        if started:
            ray.shutdown()
