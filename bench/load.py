"""Load benchmark of the HTTP service, from a second process, at rising concurrency (loopback only).

    python -m bench.load                                  # spawns a server on a tiny LLaVA, then drives it
    python -m bench.load --url http://127.0.0.1:8000      # drives a server that is already running

Each level runs closed-loop clients (each sends its next request when the last one is answered), bounded
by --requests per level and --seconds per level. Printed per level: requests/s, completion tokens/s,
p50/p99 latency, errors, and the server's overhead: the client-side /caption latency minus the engine's own
time for the same request (header `x-engine-time-ms`: submission to the engine -> final token, queueing
included), i.e. HTTP, multipart parsing, image decoding, validation, hand-offs and serialisation; and
`srv p50`, the part of it spent inside the server process (`x-server-time-ms` minus the engine time), the
rest being the network and this client, which shares the machine's CPUs with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

from sevi.families import DEFAULT_PROMPT

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Sample:
    status: int
    latency_s: float
    engine_ms: float | None = None
    queue_ms: float | None = None
    server_ms: float | None = None
    completion_tokens: int = 0


@dataclass
class Level:
    concurrency: int
    requests: int
    seconds: float
    errors: dict[str, int] = field(default_factory=dict)
    requests_per_s: float = 0.0
    tokens_per_s: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    engine_p50_ms: float = 0.0
    queue_p50_ms: float = 0.0
    overhead_p50_ms: float = 0.0
    overhead_p99_ms: float = 0.0
    server_overhead_p50_ms: float = 0.0  # the part inside the server process (arrival -> response)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def images(n: int = 16, size: int = 64, seed: int = 0) -> list[bytes]:
    """Distinct small PNGs (different pixels, so nothing can be cached between requests)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


async def run_level(
    client: httpx.AsyncClient,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    form: dict[str, str],
    pngs: list[bytes],
) -> Level:
    samples: list[Sample] = []
    issued = 0
    t0 = time.perf_counter()
    stop_at = t0 + max_seconds

    async def worker() -> None:
        nonlocal issued
        while issued < max_requests and time.perf_counter() < stop_at:
            png = pngs[issued % len(pngs)]
            issued += 1
            start = time.perf_counter()
            try:
                r = await client.post("/caption", files={"image": ("i.png", png, "image/png")}, data=form)
            except httpx.HTTPError as exc:
                samples.append(Sample(status=-1, latency_s=time.perf_counter() - start))
                print(f"  transport error: {type(exc).__name__}", file=sys.stderr)
                continue
            latency = time.perf_counter() - start
            s = Sample(r.status_code, latency)
            if r.status_code == 200:
                s.engine_ms = float(r.headers["x-engine-time-ms"])
                s.queue_ms = float(r.headers["x-queue-time-ms"])
                s.server_ms = float(r.headers["x-server-time-ms"])
                s.completion_tokens = int(r.json()["usage"]["completion_tokens"])
            samples.append(s)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    ok = [s for s in samples if s.status == 200]
    level = Level(concurrency, len(samples), round(seconds, 3))
    for s in samples:
        if s.status != 200:
            level.errors[str(s.status)] = level.errors.get(str(s.status), 0) + 1
    lat = [s.latency_s * 1000 for s in ok]
    over = [s.latency_s * 1000 - (s.engine_ms or 0.0) for s in ok]
    level.requests_per_s = round(len(ok) / seconds, 2)
    level.tokens_per_s = round(sum(s.completion_tokens for s in ok) / seconds, 1)
    level.latency_p50_ms, level.latency_p99_ms = round(pct(lat, 50), 2), round(pct(lat, 99), 2)
    level.engine_p50_ms = round(pct([s.engine_ms or 0.0 for s in ok], 50), 2)
    level.queue_p50_ms = round(pct([s.queue_ms or 0.0 for s in ok], 50), 2)
    level.overhead_p50_ms, level.overhead_p99_ms = round(pct(over, 50), 2), round(pct(over, 99), 2)
    level.server_overhead_p50_ms = round(pct([(s.server_ms or 0.0) - (s.engine_ms or 0.0) for s in ok], 50), 2)
    return level


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_server(model: str | None, extra: list[str]) -> tuple[subprocess.Popen[bytes], str, Any]:
    tmp = tempfile.TemporaryDirectory(prefix="sevi-bench-")
    if model is None:
        model = str(Path(tmp.name) / "tiny-llava")
        subprocess.run(
            [sys.executable, "-m", "sevi.testing.tiny", "--family", "llava", "--out", model],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    port = free_port()
    log = open(Path(tmp.name) / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    cmd = [
        sys.executable,
        "-m",
        "server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", (tmp, log)


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not become ready in {timeout:.0f} s")


async def drive(args: argparse.Namespace, url: str) -> list[Level]:
    form = {
        "max_tokens": str(args.max_tokens),
        "conservativeness": str(args.conservativeness),
        "prompt": DEFAULT_PROMPT,
    }
    pngs = images()
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    levels = []
    async with httpx.AsyncClient(base_url=url, timeout=args.seconds + 60, limits=limits, headers=headers) as c:
        await run_level(c, 2, 4, 30, form, pngs)  # warm-up: first-call costs are not the steady state
        for n in args.concurrency:
            level = await run_level(c, n, args.requests, args.seconds, form, pngs)
            levels.append(level)
            print(
                f"{n:>4} {level.requests:>5} {level.requests_per_s:>8.2f} {level.tokens_per_s:>8.1f} "
                f"{level.latency_p50_ms:>9.1f} {level.latency_p99_ms:>9.1f} {level.engine_p50_ms:>9.1f} "
                f"{level.queue_p50_ms:>8.1f} {level.overhead_p50_ms:>8.2f} {level.overhead_p99_ms:>8.2f} "
                f"{level.server_overhead_p50_ms:>8.2f}  "
                f"{json.dumps(level.errors) if level.errors else '-'}",
                flush=True,
            )
    return levels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (loopback only); default: spawn one")
    p.add_argument("--model", help="model folder for the spawned server (default: build a tiny LLaVA)")
    p.add_argument(
        "--server-args", default="--max-batch-size 8 --torch-threads 1", help="extra flags for the spawned server"
    )
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated levels")
    p.add_argument("--requests", type=int, default=48, help="most requests per level")
    p.add_argument("--seconds", type=float, default=60, help="most seconds per level")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--conservativeness", default="0.5")
    p.add_argument("--api-key", default=os.environ.get("SEVI_API_KEY"))
    p.add_argument("--json", help="also write the levels here")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in str(args.concurrency).split(",") if x]
    if not 1 <= max(args.concurrency) <= 256 or args.requests > 10_000 or args.seconds > 600:
        raise SystemExit("bounds: concurrency 1..256, --requests <= 10000, --seconds <= 600")

    proc = None
    keep: Any = None
    if args.url:
        url = args.url.rstrip("/")
        if urlsplit(url).hostname not in LOOPBACK:
            raise SystemExit("bench/load.py drives loopback servers only (127.0.0.1, localhost, ::1)")
    else:
        proc, url, keep = spawn_server(args.model, args.server_args.split())
    try:
        wait_ready(url, proc)
        model = httpx.get(
            url + "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        ).json()["data"][0]["id"]
        print(
            f"# {url} model={model} max_tokens={args.max_tokens} conservativeness={args.conservativeness} "
            f"server_args={'(external)' if args.url else args.server_args!r} cpus={os.cpu_count()}"
        )
        print(
            f"{'conc':>4} {'reqs':>5} {'req/s':>8} {'tok/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'eng p50':>9} "
            f"{'queue50':>8} {'ovh p50':>8} {'ovh p99':>8} {'srv p50':>8}  errors"
        )
        levels = asyncio.run(drive(args, url))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if keep is not None:
            keep[1].close()
            keep[0].cleanup()
    first = levels[0]
    overhead = statistics.median(lv.overhead_p50_ms for lv in levels)
    inside = statistics.median(lv.server_overhead_p50_ms for lv in levels)
    print(
        f"# overhead p50 over the engine time (target < 10 ms): {first.overhead_p50_ms:.2f} ms at concurrency "
        f"{first.concurrency}, {overhead:.2f} ms median over levels; inside the server process: "
        f"{first.server_overhead_p50_ms:.2f} ms and {inside:.2f} ms"
    )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(lv) for lv in levels], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
