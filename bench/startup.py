"""Start-up to `/ready`: a cold start on an empty cache root, then warm restarts on the caches it left.

    python -m bench.startup [--model models/bundled] [--restarts 2] [--engine-core thread]

Each start is `python -m server --engine vllm` with `HOME` pointing at one fresh folder for the whole run, so the
SEVI kernel builds (`~/.cache/sevi-serve`), vLLM's compile cache (`~/.cache/vllm`) and inductor's are empty at the
first start and warm at the next, as with a container on a named cache volume. For each start: seconds to
`/ready`, the seconds of vLLM's model warm-up and whether vLLM reported a compile-cache load failure ("Compiling
model again due to a load failure": what every warm start did before the fixes of issue 31), read from its log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

WARMUP = re.compile(r"(\d\d:\d\d:\d\d) \[cpu_model_runner\.py:\d+\] Warming up (model for the compilation|done)")


def warmup_seconds(text: str) -> float | None:
    """vLLM's CPU model warm-up (between its two log lines)."""
    marks = {m.group(2): m.group(1) for m in WARMUP.finditer(text)}
    if len(marks) != 2:
        return None
    start, end = (sum(int(x) * f for x, f in zip(marks[k].split(":"), (3600, 60, 1), strict=True)) for k in marks)
    return float((end - start) % 86400)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_start(args: argparse.Namespace, home: Path, log: Path, timeout_s: float) -> dict[str, Any]:
    port = free_port()
    env = dict(os.environ, HOME=str(home), SEVI_VLLM_ENGINE_CORE=args.engine_core)
    env.pop("XDG_CACHE_HOME", None)
    cmd = [sys.executable, "-m", "server", "--engine", "vllm", "--model", args.model, "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "info"]  # fmt: skip
    t0 = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    ready = None
    try:
        while time.perf_counter() - t0 < timeout_s and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    ready = time.perf_counter() - t0
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    if ready is None:
        raise SystemExit(f"no /ready within {timeout_s:.0f} s; log: {log}\n{text[-3000:]}")
    return {
        "ready_s": round(ready, 1),
        "vllm_warmup_s": warmup_seconds(text),
        "compile_cache_load_failure": "load failure" in text,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/bundled")
    p.add_argument("--restarts", type=int, default=2, help="warm starts after the cold one")
    p.add_argument("--engine-core", default="thread", choices=["thread", "process"])
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", help="also write the starts here")
    args = p.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    starts = []
    try:
        for i in range(1 + args.restarts):
            kind = "cold" if i == 0 else "warm"
            start = {"start": kind, **one_start(args, home, home / f"start-{i}.log", args.timeout)}
            starts.append(start)
            print(
                f"{kind:4} ready in {start['ready_s']:6.1f} s  vLLM's model warm-up {start['vllm_warmup_s']} s"
                f"  compile-cache load failure: {start['compile_cache_load_failure']}"
            )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "starts": starts}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
