"""The batch command (`python -m server.batch`) against the other ways to caption a collection, side by side in one run.

    python -m bench.batch_caption [--model DIR] [--parts api,run-batch,memory,ray] [--items 64] [--max-tokens 32]

Parts (each prints its figures and ratios; all go to --json):
- `api`: the batch command against the HTTP API (`python -m server`, same engine and settings) driven by closed-loop
  clients posting /caption at each `--concurrency`; the ratio is taken against the API's best concurrency.
- `run-batch`: the batch command at c = 0 against stock vLLM's `run_batch` (vllm.entrypoints.openai.run_batch, no
  plugin loaded: VLLM_PLUGINS=none) on the same OpenAI batch file; steady rates (start-up excluded: the batch
  command's summary, run_batch's final progress line) and wall times (start-up included).
- `memory`: a generated manifest of `--memory-items` images (10,000 by default) through the batch command on a tiny
  LLaVA, its RSS sampled as it goes (flat RSS: the input is streamed, the window bounds what is in memory).
- `ray`: `--ray --workers 1` against `--workers 2` (one core each) on the same folder; captioning time from the
  first batch an actor started to the last one's end (start-up excluded), and wall time.

The model: `--model DIR`, else a random LLaVA with `--image-tokens` (576 = LLaVA-1.5) whose EOS never wins, so every
request runs to --max-tokens (equal work on every side). Every side runs the vLLM engine with the same batch limit
(`--max-batch-size`; vLLM's max_num_seqs is twice it), KV cache, context length and thread binding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.engines import never_eos, random_llava
from bench.load import images
from bench.vs_vllm import Server
from sevi.families import DEFAULT_PROMPT

MODEL_NAME = "bench"


def write_folder(folder: Path, pngs: list[bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, png in enumerate(pngs):
        (folder / f"img{i:05d}.png").write_bytes(png)
    return folder


def env(args: argparse.Namespace) -> dict[str, str]:
    return dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE=str(args.kv_cache_gib),
        VLLM_CPU_OMP_THREADS_BIND=args.threads_bind,
        SEVI_VLLM_CPU_KV_CACHE_GIB=str(args.kv_cache_gib),
        SEVI_VLLM_MAX_MODEL_LEN=str(args.max_model_len),
        SEVI_VLLM_ENFORCE_EAGER="true" if args.eager else "false",
    )


def batch_cmd(args: argparse.Namespace, model: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "server.batch", "--model", str(model), "--engine", args.engine,
        "--served-model-name", MODEL_NAME, "--input", str(inp), "--output", str(out),
        "--max-tokens", str(args.max_tokens), "--max-batch-size", str(args.max_batch_size),
        "--dtype", args.dtype, "--log-level", "warning", "--progress", "off", *extra,
    ]  # fmt: skip


def run_batch_command(cmd: list[str], environ: dict[str, str], log: Path) -> tuple[dict[str, Any], float]:
    """Runs the batch command; (its JSON summary, wall seconds)."""
    t0 = time.perf_counter()
    with log.open("wb") as err:
        proc = subprocess.run(cmd, env=environ, stdout=subprocess.PIPE, stderr=err, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"batch command failed ({proc.returncode}); log: {log}\n{log.read_text()[-3000:]}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1]), wall


def steady_rate(output: Path, skip: float = 0.25) -> float:
    """Results per second after the first `skip` of them (the first wave pays the process's first-use costs, which
    the API's figures leave out by a warm-up): from the results' completion times."""
    times = sorted(json.loads(line)["timings"]["completed_at"] for line in output.read_text().splitlines())
    k = int(len(times) * skip)
    return (len(times) - 1 - k) / max(times[-1] - times[k], 1e-9)


def stock_steady_rate(log_text: str, skip: float = 0.25) -> float | None:
    """The same for vLLM's run_batch, from its progress lines (n/total [mm:ss<...], one-second resolution); None
    when what follows the first quarter spans under 3 s of those stamps (too coarse to give a rate: use more
    --items)."""
    points = [
        (int(n), int(a) * 60 + int(b)) for n, a, b in re.findall(r"Completed \| (\d+)/\d+ \[(\d+):(\d+)<", log_text)
    ]
    total = points[-1][0]
    start = next(p for p in points if p[0] >= skip * total)
    end = points[-1]
    if end[1] - start[1] < 3:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


# ---- part: the HTTP API at its best concurrency ------------------------------------------------------------------


async def closed_loop(url: str, pngs: list[bytes], concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    issued = done = tokens = errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as c:

        async def worker() -> None:
            nonlocal issued, done, tokens, errors
            while issued < len(pngs):
                png = pngs[issued]
                issued += 1
                data = {"conservativeness": str(args.level), "max_tokens": str(args.max_tokens)}
                r = await c.post("/caption", files={"image": ("x.png", png, "image/png")}, data=data)
                if r.status_code != 200:
                    errors += 1
                    continue
                done += 1
                tokens += int(r.json()["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    return {"concurrency": concurrency, "images_per_s": done / seconds, "tokens_per_s": tokens / seconds,
            "errors": errors, "seconds": seconds}  # fmt: skip


def part_api(args: argparse.Namespace, model: Path, work: Path) -> dict[str, Any]:
    """`--rounds` alternating turns (the batch command, then the API at each concurrency), fresh images in every
    turn; the ratio is taken per round (batch after its first quarter / the API at that round's best concurrency)
    and the median reported, so that a machine whose speed drifts between turns moves both sides alike."""
    rounds = []
    for rnd in range(args.rounds):
        pngs = images(args.items, seed=11 + 100 * rnd)
        folder = write_folder(work / f"api-images-{rnd}", pngs)
        out = work / f"api-batch-{rnd}.jsonl"
        summary, wall = run_batch_command(
            batch_cmd(args, model, folder, out, "--levels", str(args.level)), env(args), work / f"api-batch-{rnd}.log"
        )
        whole_rate = summary["this_run"]["images_per_s"]
        batch_rate = steady_rate(out)
        print(f"[api] round {rnd}: batch command {whole_rate:.2f} images/s over the job, {batch_rate:.2f} after its "
              f"first quarter")  # fmt: skip
        server = Server(
            "sevi-serve",
            [sys.executable, "-m", "server", "--engine", args.engine, "--model", str(model), "--served-model-name",
             MODEL_NAME, "--host", "127.0.0.1", "--dtype", args.dtype, "--max-batch-size", str(args.max_batch_size),
             "--max-queue", "1024", "--log-level", "warning", "--max-tokens-limit", str(max(1024, args.max_tokens))],
            env(args), work, "/ready",
        )  # fmt: skip
        levels = []
        try:
            server.wait_ready(args.start_timeout)
            asyncio.run(closed_loop(server.url, images(4, seed=99), 2, args))  # warm-up
            for c in args.concurrency:
                # Images of their own at each level: vLLM's prefix and multimodal caches would serve a second pass
                # over the same images (prefill and preprocessing skipped), which a collection captioned once never
                # sees (a first version of this benchmark reused them, and the API gained 2-3x from it).
                lv = asyncio.run(closed_loop(server.url, images(args.items, seed=1000 + 100 * rnd + c), c, args))
                levels.append(lv)
                print(f"[api] round {rnd}: HTTP /caption c={c:<3} {lv['images_per_s']:.2f} images/s "
                      f"({lv['errors']} errors)")  # fmt: skip
        finally:
            server.stop()
        best = max(levels, key=lambda lv: lv["images_per_s"])
        ratio = batch_rate / best["images_per_s"]
        print(f"[api] round {rnd}: batch (after its first quarter) / API at its best concurrency "
              f"({best['concurrency']}, warmed up): {ratio:.2f}x; over the whole job "
              f"{whole_rate / best['images_per_s']:.2f}x")  # fmt: skip
        rounds.append({"batch": summary["this_run"], "batch_steady_images_per_s": batch_rate, "batch_wall_s": wall,
                       "api": levels, "best_concurrency": best["concurrency"],
                       "ratio_batch_over_best_api": ratio})  # fmt: skip
    ratios = sorted(r["ratio_batch_over_best_api"] for r in rounds)
    median = (
        ratios[len(ratios) // 2] if len(ratios) % 2 else (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
    )
    print(f"[api] batch / API at its best concurrency, median of {len(rounds)} rounds: {median:.2f}x "
          f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
    return {"rounds": rounds, "ratio_batch_over_best_api": median}


# ---- part: stock vLLM run_batch on the same OpenAI batch file ----------------------------------------------------


def openai_file(path: Path, pngs: list[bytes], args: argparse.Namespace) -> Path:
    import base64

    with path.open("w") as f:
        for i, png in enumerate(pngs):
            uri = "data:image/png;base64," + base64.b64encode(png).decode()
            content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": DEFAULT_PROMPT}]
            body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}],
                    "max_tokens": args.max_tokens, "temperature": 0}  # fmt: skip
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
            f.write("\n")
    return path


def _fmt(x: float | None) -> str:
    return "n/a (too short: more --items)" if x is None else f"{x:.2f}"


def stock_run_batch(args: argparse.Namespace, model: Path, inp: Path, out: Path, log: Path) -> tuple[float, float]:
    """(steady requests/s from run_batch's last progress line, wall seconds)."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(inp), "-o", str(out),
        "--model", str(model), "--served-model-name", MODEL_NAME, "--dtype", args.dtype,
        "--max-num-seqs", str(2 * args.max_batch_size), "--max-model-len", str(args.max_model_len),
        *(["--enforce-eager"] if args.eager else []),
    ]  # fmt: skip
    t0 = time.perf_counter()
    with log.open("wb") as f:
        proc = subprocess.run(cmd, env=dict(env(args), VLLM_PLUGINS="none"), stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"vLLM run_batch failed ({proc.returncode}); log: {log}\n{text[-3000:]}")
    # Its final progress line: n/n [mm:ss<...]. The rate tqdm prints there is a moving average; n / elapsed is not.
    m = re.findall(r"100% Completed \| (\d+)/\d+ \[(\d+):(\d+)(?::(\d+))?<", text)
    if not m:
        raise SystemExit(f"no final progress line in {log}")
    n, a, b, c = m[-1]
    elapsed = int(a) * 60 + int(b) if not c else int(a) * 3600 + int(b) * 60 + int(c)
    rate = int(n) / max(elapsed, 1)
    return rate, wall


def part_run_batch(args: argparse.Namespace, model: Path, work: Path) -> dict[str, Any]:
    pngs = images(args.items, seed=12)
    batch_file = openai_file(work / "openai-batch.jsonl", pngs, args)
    rounds = []
    for rnd in range(args.rounds):
        # The two take turns, the order reversed every other round: the machine's load drifts between runs.
        order = ["ours", "stock"] if rnd % 2 == 0 else ["stock", "ours"]
        r: dict[str, Any] = {}
        for side in order:
            if side == "ours":
                ours, wall = run_batch_command(
                    batch_cmd(args, model, batch_file, work / f"ours-openai-{rnd}.jsonl", "--levels", "0"), env(args),
                    work / f"ours-{rnd}.log",
                )  # fmt: skip
                assert ours["failures"] == 0, ours
                r["ours_req_per_s"], r["ours_wall_s"] = ours["this_run"]["results_per_s"], wall
                r["ours_steady_req_per_s"] = steady_rate(work / f"ours-openai-{rnd}.jsonl")
            else:
                rate, wall = stock_run_batch(
                    args, model, batch_file, work / f"stock-openai-{rnd}.jsonl", work / f"stock-{rnd}.log"
                )
                r["stock_req_per_s"], r["stock_wall_s"] = rate, wall
                r["stock_steady_req_per_s"] = stock_steady_rate((work / f"stock-{rnd}.log").read_text(errors="replace"))
        r["ratio_whole"] = r["ours_req_per_s"] / r["stock_req_per_s"]
        stock_steady = r["stock_steady_req_per_s"]
        r["ratio_steady"] = r["ours_steady_req_per_s"] / stock_steady if stock_steady else None
        r["ratio_wall"] = r["stock_wall_s"] / r["ours_wall_s"]
        rounds.append(r)
        print(f"[run-batch] round {rnd}: whole batch {r['ours_req_per_s']:.2f} vs stock "
              f"{r['stock_req_per_s']:.2f} req/s "
              f"({r['ratio_whole']:.2f}x); after the first quarter {r['ours_steady_req_per_s']:.2f} vs "
              f"{_fmt(r['stock_steady_req_per_s'])} ({_fmt(r['ratio_steady'])}x); wall with start-up "
              f"{r['ours_wall_s']:.0f} s vs {r['stock_wall_s']:.0f} s ({r['ratio_wall']:.2f}x)",
              flush=True)  # fmt: skip
    best = max(x["ours_req_per_s"] for x in rounds) / max(x["stock_req_per_s"] for x in rounds)
    stock_steady = [x["stock_steady_req_per_s"] for x in rounds if x["stock_steady_req_per_s"]]
    best_steady = max(x["ours_steady_req_per_s"] for x in rounds) / max(stock_steady) if stock_steady else None
    print(
        f"[run-batch] best of {len(rounds)} rounds each, batch command c=0 / stock vLLM run_batch: whole batch "
        f"{best:.2f}x, after the first quarter {_fmt(best_steady)}x"
    )
    return {"rounds": rounds, "ratio_best": best, "ratio_best_steady": best_steady}


# ---- part: memory over a 10,000-item manifest --------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def part_memory(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from sevi.testing.tiny import build

    tiny = work / "tiny-llava"
    if not (tiny / "config.json").exists():
        build("llava", tiny, seed=0, layers=4, heads=8, kv_heads=4)
    folder = work / "memory-images"
    folder.mkdir(exist_ok=True)
    manifest = work / "memory-manifest.jsonl"
    with manifest.open("w") as f:
        for i, png in enumerate(images(args.memory_items, size=32, seed=13)):
            name = f"m{i:05d}.png"
            (folder / name).write_bytes(png)
            f.write(json.dumps({"id": f"m{i}", "image": f"memory-images/{name}"}) + "\n")
    out = work / "memory-out.jsonl"
    out.unlink(missing_ok=True)
    cmd = batch_cmd(args, tiny, manifest, out, "--levels", "0")
    cmd[cmd.index("--max-tokens") + 1] = str(args.memory_max_tokens)
    samples: list[tuple[int, float]] = []
    proc = subprocess.Popen(cmd, env=env(args), stdout=subprocess.PIPE, stderr=(work / "memory.log").open("wb"))
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set() and proc.poll() is None:
            try:
                lines = out.read_bytes().count(b"\n") if out.exists() else 0
                samples.append((lines, rss_mib(proc.pid)))
            except (FileNotFoundError, ProcessLookupError):
                pass
            stop.wait(1.0)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    stdout, _ = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"memory run failed; log: {work / 'memory.log'}")
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    n = args.memory_items
    marks = {}
    for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
        at = [rss for lines, rss in samples if lines >= frac * n * 0.98]
        if at:
            marks[f"{int(frac * 100)}%"] = round(at[0], 1)
    peak = max(rss for _, rss in samples)
    growth = marks.get("100%", float("nan")) - marks.get("10%", float("nan"))
    print(f"[memory] {n} items: RSS (MiB) at {marks}; peak {peak:.1f}; from 10% to the end {growth:+.1f} MiB; "
          f"{summary['this_run']['results_per_s']:.1f} results/s")  # fmt: skip
    return {"items": n, "rss_mib_at": marks, "peak_mib": peak, "growth_mib_10_to_100": growth,
            "samples": samples[:: max(1, len(samples) // 60)],
            "this_run": summary["this_run"]}  # fmt: skip


# ---- part: Ray, 2 actors against 1 -------------------------------------------------------------------------------


def part_ray(args: argparse.Namespace, model: Path, work: Path) -> dict[str, Any]:
    folder = write_folder(work / "ray-images", images(args.items, seed=14))
    out: dict[str, Any] = {}
    for workers in (1, 2):
        summary, wall = run_batch_command(
            batch_cmd(args, model, folder, work / f"ray-{workers}.jsonl", "--levels", str(args.level), "--ray",
                      "--workers", str(workers), "--cpus-per-worker", "1",
                      "--ray-batch-size", str(args.ray_batch_size)),
            env(args), work / f"ray-{workers}.log",
        )  # fmt: skip
        r = summary["this_run"]
        rate = r["results_per_s"]  # over the captioning span: first batch started to last batch done
        out[f"workers_{workers}"] = {"this_run": r, "wall_s": wall, "results_per_s": rate}
        print(f"[ray] {workers} actor(s): {rate:.2f} results/s captioning, wall {wall:.1f} s")
    out["speedup"] = out["workers_2"]["results_per_s"] / out["workers_1"]["results_per_s"]
    out["speedup_wall"] = out["workers_1"]["wall_s"] / out["workers_2"]["wall_s"]
    print(f"[ray] 2 actors / 1: {out['speedup']:.2f}x captioning, {out['speedup_wall']:.2f}x wall")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batch_caption", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model folder (default: a random LLaVA, see --image-tokens)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--image-tokens", type=int, default=576, choices=[16, 144, 576])
    p.add_argument("--parts", default="api,run-batch,memory,ray")
    p.add_argument("--engine", default="vllm")
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--level", type=float, default=0.5, help="conservativeness of the api and ray parts")
    p.add_argument("--concurrency", default="4,8,16,32", help="the API's closed-loop client counts")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads-bind", default="0", help="VLLM_CPU_OMP_THREADS_BIND (not the Ray part's actors)")
    p.add_argument("--eager", action="store_true", help="every side without torch.compile")
    p.add_argument("--memory-items", type=int, default=10_000)
    p.add_argument("--memory-max-tokens", type=int, default=2)
    p.add_argument("--ray-batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="api and run-batch parts: turns of each side")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--work", type=Path, help="folder for inputs, outputs and logs (default: a temporary one)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in str(args.concurrency).split(",") if x]
    parts = [x for x in args.parts.split(",") if x]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or never_eos(random_llava(args.layers, args.heads, args.heads, args.image_tokens))
    print(f"model {model}; work folder {work}", flush=True)
    results: dict[str, Any] = {"model": str(model), "args": {k: str(v) for k, v in vars(args).items()}}
    for part in parts:
        t0 = time.perf_counter()
        if part == "api":
            results["api"] = part_api(args, model, work)
        elif part == "run-batch":
            results["run_batch"] = part_run_batch(args, model, work)
        elif part == "memory":
            results["memory"] = part_memory(args, work)
        elif part == "ray":
            results["ray"] = part_ray(args, model, work)
        else:
            raise SystemExit(f"unknown part {part!r}")
        print(f"({part}: {time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
