"""sevi-serve against stock vLLM's own OpenAI server: same model, same load, side by side in one run.

    python -m bench.vs_vllm [--concurrency 1,8,16] [--rounds 2] [--sevi-levels 0,0.5] [--contrast]

Two servers on one random LLaVA (default 8 layers x 16 heads, 576 image tokens, float32): vLLM's
`vllm.entrypoints.openai.api_server` with no plugin loaded (`VLLM_PLUGINS=none`: stock attention, stock
scheduler, its own defaults), and sevi-serve (`python -m server --engine vllm`), driven at each
conservativeness of `--sevi-levels` in turn (alignment only unless `--contrast`). Both get the same batch
capacity (vLLM's max_num_seqs = 2 x sevi-serve's max batch: a request with contrast is two rows), the same
context length, KV cache size and worker thread binding (`VLLM_CPU_OMP_THREADS_BIND`, one core by default on
these 2-core machines, the other left to the HTTP processes), and the same requests: `/v1/chat/completions`,
one distinct image each, greedy, `--max-tokens` (the random model's EOS never wins, so every request runs to
it). Closed-loop clients at each concurrency; the arms (stock, then
each sevi-serve level) take turns per concurrency and their order reverses every other round. Printed: each
turn's completion tokens/s, then per concurrency the best of the rounds and the ratios: each sevi-serve level
against stock vLLM, and each aligned level against sevi-serve at c = 0 (the alignment's cost in one server).
The servers stay up between turns (an idle vLLM engine waits on its queue), so neither pays start-up or
compilation inside a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.engines import never_eos, random_llava
from bench.load import free_port, images, pct
from sevi.families import DEFAULT_PROMPT

MODEL_NAME = "bench"


@dataclass
class Turn:
    server: str  # "stock-vllm", or "sevi c=<level>"
    concurrency: int
    round: int
    requests: int
    seconds: float
    tokens_per_s: float
    latency_p50_ms: float
    errors: int
    # CPU time of the server's whole process group (HTTP, engine core, workers) per completion token: its own work
    # per token, which other jobs on a shared machine inflate far less than they inflate wall time.
    cpu_ms_per_token: float = 0.0
    # With --client vllm: vLLM's benchmark client's own figures.
    requests_per_s: float = 0.0
    median_tpot_ms: float = 0.0
    failed: int = 0


class Server:
    """A server process in its own session (vLLM forks an engine core; the whole group is stopped)."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path, ready_path: str, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.label = name  # its arms' names in the report
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(self.port)],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"{self.name} exited with {self.proc.returncode}; log: {self.log_path}\n"
                    f"{self.log_path.read_text(errors='replace')[-3000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            time.sleep(1)
        raise SystemExit(f"{self.name} not ready within {timeout:.0f} s; log: {self.log_path}")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def servers(args: argparse.Namespace, model_dir: Path, log_dir: Path) -> tuple[Server, list[Server]]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.kv_cache_gib), VLLM_CPU_OMP_THREADS_BIND=args.threads_bind)
    max_len = str(args.max_model_len)
    stock = Server(
        "stock-vllm",
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            MODEL_NAME,
            "--host",
            "127.0.0.1",
            "--dtype",
            args.dtype,
            "--max-model-len",
            max_len,
            "--max-num-seqs",
            str(2 * args.max_batch_size),
            "--gpu-memory-utilization",
            str(args.gpu_memory_utilization),
            *(["--enforce-eager"] if args.eager else []),
        ],
        dict(env, VLLM_PLUGINS="none"),
        log_dir,
        "/health",
    )
    sevi_env = dict(
        env,  # SEVI_VLLM_ENGINE_CORE: set per server below
        SEVI_VLLM_MAX_MODEL_LEN=max_len,
        SEVI_VLLM_CPU_KV_CACHE_GIB=str(args.kv_cache_gib),
        SEVI_VLLM_ENFORCE_EAGER="true" if args.eager else "false",
        SEVI_VLLM_GPU_MEMORY_UTILIZATION=str(args.gpu_memory_utilization),
    )
    return stock, [sevi_server(core, args, model_dir, sevi_env, log_dir) for core in args.engine_core]


def sevi_server(core: str, args: argparse.Namespace, model_dir: Path, env: dict[str, str], log_dir: Path) -> Server:
    """sevi-serve with its vLLM engine core in a thread or in its own process; labelled by it when several run."""
    server = Server(
        "sevi-serve" if len(args.engine_core) == 1 else f"sevi-serve-{core}",
        [
            sys.executable,
            "-m",
            "server",
            "--engine",
            "vllm",
            "--model",
            str(model_dir),
            "--served-model-name",
            MODEL_NAME,
            "--host",
            "127.0.0.1",
            "--dtype",
            args.dtype,
            "--max-batch-size",
            str(args.max_batch_size),
            "--max-queue",
            "1024",
            "--log-level",
            "warning",
        ],
        dict(env, SEVI_VLLM_ENGINE_CORE=core),
        log_dir,
        "/ready",
    )
    server.label = "sevi" if len(args.engine_core) == 1 else f"sevi[{core}]"
    return server


def body(png: bytes, args: argparse.Namespace, level: float | None) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    out: dict[str, Any] = {
        "model": MODEL_NAME,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": DEFAULT_PROMPT}],
            }
        ],
    }
    if level is not None:  # sevi-serve
        out["conservativeness"] = level
        out["alignment"] = {"contrast": bool(args.contrast)}
    return out


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in the process group `pgid` (a server: its HTTP process,
    vLLM's engine core and workers)."""
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid:
                t = proc.cpu_times()
                total += t.user + t.system
    return total


async def turn(
    server: Server, level: float | None, concurrency: int, rnd: int, args: argparse.Namespace, pngs: list[bytes]
) -> Turn:
    """One server at one concurrency: `concurrency` closed-loop clients until the turn's requests are answered
    (`level`: sevi-serve's conservativeness; None for stock vLLM)."""
    n_requests = max(args.requests, 2 * concurrency)
    issued, latencies, tokens, errors = 0, [], 0, 0
    async with httpx.AsyncClient(
        base_url=server.url, timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)
    ) as client:

        async def worker() -> None:
            nonlocal issued, tokens, errors
            while issued < n_requests:
                png = pngs[issued % len(pngs)]
                issued += 1
                start = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body(png, args, level))
                if r.status_code != 200:
                    errors += 1
                    print(f"  {server.name} ({level}): HTTP {r.status_code} {r.text[:200]}", file=sys.stderr)
                    continue
                latencies.append((time.perf_counter() - start) * 1000)
                tokens += int(r.json()["usage"]["completion_tokens"])

        cpu0 = group_cpu_seconds(server.proc.pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
        cpu = group_cpu_seconds(server.proc.pid) - cpu0
    name = server.name if level is None else f"{server.label} c={level:g}"
    return Turn(
        name,
        concurrency,
        rnd,
        n_requests,
        round(seconds, 2),
        round(tokens / seconds, 1),
        round(pct(latencies, 50), 1),
        errors,
        round(1000 * cpu / max(tokens, 1), 3),
    )


async def client_turn(
    server: Server, level: float | None, concurrency: int, rnd: int, args: argparse.Namespace, model_dir: Path
) -> Turn:
    """One server at one concurrency under vLLM's own benchmark client (random-mm: one 224 x 224 image and
    `--client-input-len` random tokens per request, `ignore_eos`), a fresh seed per turn (no cache hits)."""
    from bench.vllm_client import client_args, run_client

    a = client_args(
        server.url,
        MODEL_NAME,
        str(model_dir),
        num_prompts=max(args.requests, 2 * concurrency),
        concurrency=concurrency,
        input_len=args.client_input_len,
        output_len=args.max_tokens,
        seed=1000 * rnd + concurrency + (0 if level is None else int(100 * level) + 7),
    )
    a.temperature = 0.0
    if level is not None:
        a.extra_body = {"conservativeness": level, "alignment": {"contrast": bool(args.contrast)}}
    cpu0 = group_cpu_seconds(server.proc.pid)
    r = await asyncio.to_thread(run_client, a)
    cpu = group_cpu_seconds(server.proc.pid) - cpu0
    tokens = int(r.get("total_output_tokens") or 0)
    return Turn(
        server.name if level is None else f"{server.label} c={level:g}",
        concurrency,
        rnd,
        int(r.get("completed") or 0),
        round(float(r.get("duration") or 0.0), 2),
        round(float(r.get("output_throughput") or 0.0), 1),
        round(float(r.get("median_e2el_ms") or 0.0), 1),
        int(r.get("failed") or 0),
        round(1000 * cpu / max(tokens, 1), 3),
        round(float(r.get("request_throughput") or 0.0), 2),
        round(float(r.get("median_tpot_ms") or 0.0), 2),
        int(r.get("failed") or 0),
    )


async def measure(stock: Server, sevi: list[Server], args: argparse.Namespace) -> list[Turn]:
    # Every turn sends images no server has seen (distinct pixels): a prompt seen before would be served
    # from the prefix and multimodal caches, and the arms of one server share them.
    seen = 0

    def fresh(n: int) -> list[bytes]:
        nonlocal seen
        seen += n
        return images(n, size=96, seed=seen)

    arms: list[tuple[Server, float | None]] = [(stock, None)]
    arms += [(srv, level) for srv in sevi for level in args.sevi_levels]
    # Warm-up, one wave per arm and concurrency: first requests pay one-off costs (vLLM compiles its CPU graph
    # for new batch sizes), which measured a third lower in a first round without it.
    warm = argparse.Namespace(**{**vars(args), "requests": 1})
    for concurrency in args.concurrency:
        for srv, level in arms:
            await turn(srv, level, concurrency, 0, warm, fresh(concurrency))
    turns: list[Turn] = []
    for rnd in range(args.rounds):
        for concurrency in args.concurrency:
            for srv, level in arms if rnd % 2 == 0 else arms[::-1]:
                if args.client == "vllm":
                    t = await client_turn(srv, level, concurrency, rnd, args, args.model_dir)
                else:
                    t = await turn(srv, level, concurrency, rnd, args, fresh(max(args.requests, 2 * concurrency)))
                turns.append(t)
                extra = (
                    f"  {t.requests_per_s:6.2f} req/s  TPOT {t.median_tpot_ms:6.2f} ms" if args.client == "vllm" else ""
                )
                print(
                    f"round {rnd} c={concurrency:<3} {t.server:<12} {t.tokens_per_s:8.1f} tok/s  "
                    f"p50 {t.latency_p50_ms:8.1f} ms  {t.requests} requests in {t.seconds:6.1f} s  "
                    f"cpu {t.cpu_ms_per_token:6.2f} ms/token"
                    f"{extra}"
                    f"{f'  errors {t.errors}' if t.errors else ''}",
                    flush=True,
                )
    return turns


def summary(turns: list[Turn], concurrency: list[int], levels: list[float], labels: list[str]) -> list[dict[str, Any]]:
    """Per concurrency: each arm's best rate over the rounds, the ratios of the best rates, and the median over
    rounds of each round's own ratio (turns of one round ran minutes apart, under the same load)."""
    rows = []
    names = ["stock-vllm"] + [f"{label} c={level:g}" for label in labels for level in levels]
    for c in concurrency:
        rate = {(t.server, t.round): t.tokens_per_s for t in turns if t.concurrency == c}
        rounds = sorted({r for _, r in rate})
        best = {name: max(rate[name, r] for r in rounds) for name in names}
        pairs = [(n, "stock-vllm") for n in names[1:]]
        for label in labels:  # each aligned level against its own server at c = 0
            base = f"{label} c=0"
            pairs += [(n, base) for n in names[1:] if n.startswith(label + " ") and n != base and base in names]
        ratios = {f"{a} / {b}": round(best[a] / best[b], 3) for a, b in pairs if best[b] > 0}
        medians = {f"{a} / {b}": round(statistics.median(rate[a, r] / rate[b, r] for r in rounds), 3) for a, b in pairs}
        # Per-step time: at concurrency c every step yields c tokens (decode-bound, closed loop), so c / rate is the
        # wall time of one step; the difference to stock's is what the server adds per step.
        step_ms = {name: round(1000 * c / best[name], 2) for name in names if best[name] > 0}
        cpu = {(t.server, t.round): t.cpu_ms_per_token for t in turns if t.concurrency == c}
        cpu_ms = {name: min(cpu[name, r] for r in rounds) for name in names}
        overhead = {n: round(step_ms[n] - step_ms["stock-vllm"], 2) for n in names[1:] if n in step_ms}
        rows.append(
            {
                "concurrency": c,
                "tok_s": best,
                "ratios": ratios,
                "ratios_median": medians,
                "step_ms": step_ms,
                "step_overhead_ms_vs_stock": overhead,
                "cpu_ms_per_token": cpu_ms,
                "cpu_ratio_vs_stock": {
                    n: round(cpu_ms[n] / cpu_ms["stock-vllm"], 3) for n in names[1:] if cpu_ms["stock-vllm"] > 0
                },
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="HF model folder (default: a random LLaVA)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--image-tokens", type=int, default=576, choices=[16, 144, 576])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--concurrency", default="1,8,16", help="comma-separated levels")
    p.add_argument("--requests", type=int, default=16, help="requests per turn (at least 2 x concurrency)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--sevi-levels", default="0,0.5", help="sevi-serve's conservativeness levels, comma-separated")
    p.add_argument("--contrast", action="store_true", help="sevi-serve with contrastive decoding (two rows each)")
    p.add_argument("--max-batch-size", type=int, default=16, help="sevi-serve's; vLLM's max_num_seqs is twice it")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--threads-bind", default="0", help="VLLM_CPU_OMP_THREADS_BIND for both servers' workers")
    p.add_argument("--eager", action="store_true", help="both servers without torch.compile")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="each server's share of a GPU")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument(
        "--engine-core",
        default="thread",
        help="sevi-serve's vLLM engine core, comma-separated: thread (in a thread of the server), process (in its "
        "own process, AsyncLLM); one sevi-serve per value, side by side",
    )
    p.add_argument(
        "--client",
        default="own",
        choices=["own", "vllm"],
        help="own: closed-loop clients sending the same images to every arm; vllm: vLLM's own benchmark client "
        "(vllm.benchmarks.serve, random-mm, ignore_eos) against each arm",
    )
    p.add_argument("--client-input-len", type=int, default=64, help="random prompt tokens (--client vllm)")
    p.add_argument("--json", type=Path, help="also write the turns and the summary here")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in str(args.concurrency).split(",") if x]
    args.sevi_levels = [float(x) for x in str(args.sevi_levels).split(",") if x]
    args.engine_core = [x for x in str(args.engine_core).split(",") if x]
    if not args.engine_core or set(args.engine_core) - {"thread", "process"}:
        p.error("--engine-core: thread and/or process")

    model_dir = args.model or never_eos(random_llava(args.layers, args.heads, args.kv_heads, args.image_tokens))
    args.model_dir = model_dir
    log_dir = Path(tempfile.mkdtemp(prefix="bench-vs-vllm-"))
    stock, sevi = servers(args, model_dir, log_dir)
    try:
        stock.wait_ready(args.start_timeout)
        for srv in sevi:
            srv.wait_ready(args.start_timeout)
        print(
            f"model {model_dir} ({args.layers} layers x {args.heads} heads, {args.image_tokens} image tokens, "
            f"{args.dtype}); sevi-serve at conservativeness {args.sevi_levels}, contrast "
            f"{'on' if args.contrast else 'off'}; logs in {log_dir}",
            flush=True,
        )
        turns = asyncio.run(measure(stock, sevi, args))
    finally:
        stock.stop()
        for srv in sevi:
            srv.stop()
    rows = summary(turns, args.concurrency, args.sevi_levels, [srv.label for srv in sevi])
    print("\nbest of rounds, completion tokens/s; ratios of the best rates (median of the rounds' own ratios)")
    for r in rows:
        rates = "  ".join(f"{name} {rate:.1f}" for name, rate in r["tok_s"].items())
        ratios = "  ".join(
            f"{name}: {value:.3f} (median {r['ratios_median'][name]:.3f})" for name, value in r["ratios"].items()
        )
        steps = "  ".join(f"{name} {ms:.2f}" for name, ms in r["step_ms"].items())
        steps += "\n                 cpu ms/token: " + "  ".join(
            f"{name} {ms:.2f}" for name, ms in r["cpu_ms_per_token"].items()
        )
        print(
            f"concurrency {r['concurrency']:>3}:  {rates}\n                 {ratios}\n                 step ms: {steps}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "turns": [asdict(t) for t in turns],
                    "summary": rows,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
