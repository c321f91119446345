"""vLLM engine vs the reference engine, and SEVI's cost inside vLLM. Prints one table; not a test.

    python -m bench.engines [--model DIR] [--max-tokens 64] [--repeats 2]

Same model, same prompt and images, greedy decoding. Tokens/s = generated tokens / wall time of a
round of `concurrency` requests submitted together (the vLLM engine through the server's async
interface, the reference engine as one batch of the same size; concurrency 1 runs requests one at a
time). Inside vLLM, the aligned/unaligned ratio at concurrency 8: "unaligned" is conservativeness 0,
"aligned" uses explicit knobs that populate every head group on the tiny models (omega 3, start layer
1, kappa 0.6), "aligned + contrast" adds cross-image contrastive decoding (a second row per request).
Best of `--repeats` rounds after one warm-up round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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


def images(n: int) -> list[Image.Image]:
    return [Image.fromarray((np.random.default_rng(s).random((40, 48, 3)) * 255).astype("uint8")) for s in range(n)]


def requests(n: int, params: AlignmentParams, max_tokens: int, tag: str) -> list[GenerationRequest]:
    return [GenerationRequest(f"{tag}-{i}", user_message(PROMPT), [img], params, SamplingParams(max_tokens=max_tokens))
            for i, img in enumerate(images(n))]


def best_rate(run: Callable[[], int], repeats: int) -> float:
    run()  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = run()
        rates.append(tokens / (time.perf_counter() - t0))
    return max(rates)


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
    parser.add_argument("--model", type=Path, default=None, help="HF model folder (default: a tiny random LLaVA)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    model_dir = args.model
    if model_dir is None:
        model_dir = Path(tempfile.mkdtemp(prefix="bench-tiny-llava-"))
        build("llava", model_dir, seed=0, layers=4, heads=8, kv_heads=4)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from server.engines.vllm_engine import VllmEngine

    ref = ReferenceModel.load(model_dir)
    layers = ref.num_layers
    off = resolve_alignment(0, layers)
    aligned = resolve_alignment(None, layers, omega=3.0, start_layer=1, kappa=0.6, contrast=False)
    contrast = resolve_alignment(None, layers, omega=3.0, start_layer=1, kappa=0.6, contrast=True)
    n = args.max_tokens

    engine = VllmEngine(str(model_dir), model_name="bench", max_batch_size=8)
    asyncio.run(engine.start())
    while not engine.ready:
        if engine.load_error:
            raise SystemExit(engine.load_error)
        time.sleep(0.1)

    rows: list[tuple[str, float]] = []
    for conc in (1, 8):
        reqs = requests(8, off, n, f"c{conc}")
        rows.append((f"reference engine, unaligned, concurrency {conc}",
                     best_rate(lambda r=reqs, c=conc: reference_round(ref, r, c), args.repeats)))  # type: ignore[misc]
        rows.append((f"vLLM engine,      unaligned, concurrency {conc}",
                     best_rate(lambda r=reqs, c=conc: vllm_round(engine, r, c), args.repeats)))  # type: ignore[misc]
    v_off = rows[-1][1]
    v_al = best_rate(lambda: vllm_round(engine, requests(8, aligned, n, "al"), 8), args.repeats)
    v_cd = best_rate(lambda: vllm_round(engine, requests(8, contrast, n, "cd"), 8), args.repeats)
    rows.append(("vLLM engine,      aligned,   concurrency 8", v_al))
    rows.append(("vLLM engine,      aligned + contrast, concurrency 8", v_cd))
    asyncio.run(engine.stop())

    print(f"model: {model_dir}  max_tokens: {n}  greedy  (tokens/s, best of {args.repeats})")
    for name, rate in rows:
        print(f"  {name:<52} {rate:8.1f}")
    print(f"  vLLM / reference at concurrency 8:           {rows[3][1] / rows[2][1]:.2f}x  (target >= 3)")
    print(f"  vLLM aligned / unaligned (no contrast):      {v_al / v_off:.2f}   (target >= 0.85)")
    print(f"  vLLM aligned + contrast / unaligned:         {v_cd / v_off:.2f}")


if __name__ == "__main__":
    main()
