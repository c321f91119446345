"""Where a server's time goes at concurrency 1: py-spy over sevi-serve or stock vLLM on one model.

    python -m bench.profile_server --which sevi|stock [--engine-core thread] [--seconds 25] [--out PREFIX]

Starts the server (as bench/vs_vllm.py does: same model, context, KV cache, float32), warms it up, then records
`py-spy record --subprocesses -f raw` (collapsed stacks of the HTTP process, the engine core and the workers) while
one closed-loop client sends chat requests with an image; prints the request rate with and without the profiler.
Needs `py-spy` on PATH or `--py-spy PATH` (`pip install py-spy`; not a project dependency). Read the raw stacks by
leaf (native op time under the model's forward) and by process: that is how the `uni` executor's unbound OpenMP
threads showed (issue 24: the forward's native ops took 2.8x the samples of stock's worker).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.load import images
from bench.vs_vllm import MODEL_NAME, Server, body


async def closed_loop(url: str, pngs: list[bytes], args: argparse.Namespace, level: float | None, secs: float) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < secs:
            r = await client.post("/v1/chat/completions", json=body(pngs[n % len(pngs)], args, level))
            r.raise_for_status()
            n += 1
        return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", choices=["sevi", "stock"], default="sevi")
    p.add_argument("--model", default="models/bundled")
    p.add_argument("--engine-core", default="thread", choices=["thread", "process"])
    p.add_argument("--seconds", type=int, default=25)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    p.add_argument("--out", default="profile", help="raw stacks go to PREFIX-<which>.txt")
    args = p.parse_args(argv)
    args.contrast = False
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", SEVI_VLLM_CPU_KV_CACHE_GIB="2", SEVI_VLLM_MAX_MODEL_LEN="512",
               SEVI_VLLM_ENGINE_CORE=args.engine_core)  # fmt: skip
    if args.which == "sevi":
        cmd = [sys.executable, "-m", "server", "--engine", "vllm", "--model", args.model, "--served-model-name",
               MODEL_NAME, "--host", "127.0.0.1", "--dtype", "float32", "--max-batch-size", "16", "--log-level",
               "warning"]  # fmt: skip
        level: float | None = 0.0
    else:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
               "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--dtype", "float32", "--max-num-seqs",
               "32", "--max-model-len", "512"]  # fmt: skip
        env["VLLM_PLUGINS"] = "none"
        level = None
    server = Server(args.which, cmd, env, Path(tempfile.mkdtemp(prefix="profile-")), "/health")
    pngs = images(16, seed=5)
    try:
        server.wait_ready(600)
        asyncio.run(closed_loop(server.url, pngs, args, level, 5))  # warm-up
        out = f"{args.out}-{args.which}.txt"
        spy = subprocess.Popen([args.py_spy, "record", "-p", str(server.proc.pid), "--subprocesses", "-d",
                                str(args.seconds), "-r", "200", "-f", "raw", "-o", out, "--nonblocking"])  # fmt: skip
        profiled = asyncio.run(closed_loop(server.url, pngs, args, level, args.seconds - 2))
        spy.wait()
        plain = asyncio.run(closed_loop(server.url, pngs, args, level, 10))
    finally:
        server.stop()
    print(f"{args.which}: {profiled:.2f} requests/s under py-spy, {plain:.2f} without; stacks in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
