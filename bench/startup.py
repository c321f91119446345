"""Start-up to `/ready`: a cold start on an empty cache root, then warm restarts on the caches it left.

    python -m bench.startup [--model models/bundled] [--restarts 2] [--engine-core thread] [--servers sevi,stock]

Each start of sevi-serve is `python -m server --engine vllm` with `HOME` pointing at one fresh folder for the whole
run, so the SEVI kernel builds (`~/.cache/sevi-serve`), vLLM's compile cache (`~/.cache/vllm`) and inductor's are
empty at the first start and warm at the next, as with a container on a named cache volume. `stock` is the anchor:
vLLM's own OpenAI server on the same model and dtype with no plugin loaded (`VLLM_PLUGINS=none`), on a `HOME` of its
own, ready when `/health` answers (vLLM listens only once its engine is up); the servers take turns, cold starts
first. For each start: seconds to ready, the seconds of vLLM's model warm-up and whether vLLM reported a
compile-cache load failure ("Compiling model again due to a load failure": what every warm start did before the
fixes of issue 31), read from its log.
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


def command(server: str, args: argparse.Namespace, port: int) -> tuple[list[str], dict[str, str], str]:
    """The command line, extra environment and readiness path of one start of `server`."""
    if server == "stock":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model, "--dtype",
               args.dtype, "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        # sevi-serve's default KV cache (1 GiB); vLLM's own default reserves 92% of memory, which a busy machine lacks.
        return cmd, {"VLLM_PLUGINS": "none", "VLLM_CPU_KVCACHE_SPACE": "1"}, "/health"
    cmd = [sys.executable, "-m", "server", "--engine", "vllm", "--model", args.model, "--dtype", args.dtype,
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"]  # fmt: skip
    return cmd, {"SEVI_VLLM_ENGINE_CORE": args.engine_core}, "/ready"


def one_start(server: str, args: argparse.Namespace, home: Path, log: Path, timeout_s: float) -> dict[str, Any]:
    port = free_port()
    cmd, extra_env, ready_path = command(server, args, port)
    env = dict(os.environ, HOME=str(home), **extra_env)
    env.pop("XDG_CACHE_HOME", None)
    t0 = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    ready = None
    try:
        while time.perf_counter() - t0 < timeout_s and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
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
    p.add_argument("--servers", default="sevi", help="comma-separated: sevi, stock (vLLM's own server, the anchor)")
    p.add_argument("--dtype", default=None, help="both servers' dtype (default: what sevi-serve's auto picks here)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", help="also write the starts here")
    args = p.parse_args(argv)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if unknown := set(servers) - {"sevi", "stock"}:
        p.error(f"unknown servers {sorted(unknown)}; choose from sevi, stock")
    if args.dtype is None:
        from sevi.engines.dtype import resolve_dtype

        args.dtype = resolve_dtype("auto", Path(args.model), on_gpu=False)
    root = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    starts = []
    try:
        for i in range(1 + args.restarts):
            kind = "cold" if i == 0 else "warm"
            for server in servers:
                home = root / server  # one cache root per server, kept across its starts
                home.mkdir(exist_ok=True)
                figures = one_start(server, args, home, home / f"{i}.log", args.timeout)
                start = {"server": server, "start": kind, **figures}
                starts.append(start)
                print(
                    f"{server:5} {kind:4} ready in {start['ready_s']:6.1f} s  vLLM's model warm-up "
                    f"{start['vllm_warmup_s']} s  compile-cache load failure: {start['compile_cache_load_failure']}",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for server in servers:
        warm = sorted(s["ready_s"] for s in starts if s["server"] == server and s["start"] == "warm")
        if warm:
            print(f"{server:5} warm starts: median {warm[len(warm) // 2]:.1f} s, best {warm[0]:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "dtype": args.dtype, "starts": starts}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
