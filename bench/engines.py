"""vLLM engine vs the reference engine, and SEVI's cost inside vLLM. Prints one table; not a test.

    python -m bench.engines [--model DIR | --layers 8 --heads 16] [--max-tokens 64] [--repeats 3] [--threads 1]

Same model, same prompt and images, greedy decoding. Tokens/s = generated tokens / wall time of a
round of 8 requests submitted `concurrency` at a time (the vLLM engine through the server's async
interface, the reference engine as one batch of `concurrency`). Settings, at concurrency 1 and 8:
the reference engine unaligned; inside vLLM "unaligned" (conservativeness 0), "aligned" with explicit
knobs that populate every head group on the tiny models (omega 3, start layer 1, kappa 0.6), and
"aligned + contrast" (cross-image contrastive decoding, a second row per request).

The machine is shared and its load drifts, so every round runs every setting once, in turn (a drift
then hits all settings alike), after one warm-up round. Rates are the best of `--repeats` rounds; the
aligned/unaligned ratios are also given as the median over rounds of the ratio within each round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from models.conservativeness import AlignmentParams, resolve_alignment
from models.generation import GenerationRequest, ReferenceModel, SamplingParams, run_to_completion, user_message
from models.tiny import build

PROMPT = "Please describe this image in detail."
N_REQUESTS = 8


def images(n: int) -> list[Image.Image]:
    return [Image.fromarray((np.random.default_rng(s).random((40, 48, 3)) * 255).astype("uint8")) for s in range(n)]


def requests(n: int, params: AlignmentParams, max_tokens: int, tag: str) -> list[GenerationRequest]:
    return [GenerationRequest(f"{tag}-{i}", user_message(PROMPT), [img], params, SamplingParams(max_tokens=max_tokens))
            for i, img in enumerate(images(n))]


def rate(run: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    tokens = run()
    return tokens / (time.perf_counter() - t0)


def reference_round(model: ReferenceModel, reqs: list[GenerationRequest], concurrency: int) -> int:
    tokens = 0
    for i in range(0, len(reqs), concurrency):
        done = run_to_completion(model, reqs[i:i + concurrency])
        tokens += sum(len(c.token_ids) for c in done.values())
    return tokens


def vllm_round(engine: object, reqs: list[GenerationRequest], concurrency: int) -> int:
    async def one(req: GenerationRequest) -> int:
        n = 0
        async for ev in engine.generate(req):  # type: ignore[attr-defined]
            n = ev.completion_tokens
        return n

    async def all_() -> int:
        total = 0
        for i in range(0, len(reqs), concurrency):
            total += sum(await asyncio.gather(*(one(r) for r in reqs[i:i + concurrency])))
        return total

    return asyncio.run(all_())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF model folder (default: a random LLaVA built "
                        "from --layers/--heads/--kv-heads, head dim 32)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default); "
                        "1 gives the steadiest figures on a shared machine")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference engine (vLLM ratios only)")
    args = parser.parse_args(argv)
    if args.threads:
        # Before vLLM starts: its CPU worker forbids set_num_threads afterwards.
        import torch

        torch.set_num_threads(args.threads)

    model_dir = args.model
    if model_dir is None:
        model_dir = Path(tempfile.mkdtemp(prefix="bench-llava-"))
        build("llava", model_dir, seed=0, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from server.engines.vllm_engine import VllmEngine

    ref = ReferenceModel.load(model_dir)
    layers = ref.num_layers
    knobs = dict(omega=3.0, start_layer=1, kappa=0.6)
    variants = {"unaligned": resolve_alignment(0, layers),
                "aligned": resolve_alignment(None, layers, contrast=False, **knobs),  # type: ignore[arg-type]
                "aligned + contrast": resolve_alignment(None, layers, contrast=True, **knobs)}  # type: ignore[arg-type]
    n = args.max_tokens

    engine = VllmEngine(str(model_dir), model_name="bench", max_batch_size=8)
    asyncio.run(engine.start())
    while not engine.ready:
        if engine.load_error:
            raise SystemExit(engine.load_error)
        time.sleep(0.1)

    settings: list[tuple[str, Callable[[], int]]] = []
    for conc in (1, 8):
        if not args.no_reference:
            reqs = requests(N_REQUESTS, variants["unaligned"], n, f"ref{conc}")
            settings.append((f"reference engine, unaligned, concurrency {conc}",
                             lambda r=reqs, c=conc: reference_round(ref, r, c)))  # type: ignore[misc]
        for name, params in variants.items():
            reqs = requests(N_REQUESTS, params, n, f"{name}{conc}")
            settings.append((f"vLLM engine, {name}, concurrency {conc}",
                             lambda r=reqs, c=conc: vllm_round(engine, r, c)))  # type: ignore[misc]
    for _, run in settings:  # warm-up
        run()
    rounds: list[dict[str, float]] = [{name: rate(run) for name, run in settings} for _ in range(args.repeats)]
    asyncio.run(engine.stop())

    best = {name: max(r[name] for r in rounds) for name, _ in settings}
    print(f"model: {model_dir}  layers: {layers}  max_tokens: {n}  threads: {args.threads or 'default'}  greedy  "
          f"(tokens/s, best of {args.repeats} interleaved rounds)")
    for name, _ in settings:
        print(f"  {name:<52} {best[name]:8.1f}   rounds: {' '.join(f'{r[name]:.0f}' for r in rounds)}")
    for conc in (1, 8):
        if not args.no_reference:
            ratio = best[f"vLLM engine, unaligned, concurrency {conc}"] / best[
                f"reference engine, unaligned, concurrency {conc}"]
            target = "  (target >= 3)" if conc == 8 else ""
            print(f"  vLLM / reference at concurrency {conc}:{'':<19}{ratio:.2f}x{target}")
        off = f"vLLM engine, unaligned, concurrency {conc}"
        for name in ("aligned", "aligned + contrast"):
            key = f"vLLM engine, {name}, concurrency {conc}"
            median = statistics.median(r[key] / r[off] for r in rounds)
            target = "  (target >= 0.85)" if name == "aligned" else ""
            print(f"  vLLM {name} / unaligned at concurrency {conc}: best {best[key] / best[off]:.2f}, "
                  f"median per round {median:.2f}{target}")


if __name__ == "__main__":
    main()
