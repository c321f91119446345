"""Contrast pairs under load: how many requests finish with their pair dissolved. Prints one line; not a test.

    python -m bench.contrast_pairs [--requests 48] [--concurrency 16] [--image-tokens 576] [--stock-scheduler]

A random LLaVA (default 8 layers, 16 heads, 576 image tokens per prompt, as LLaVA-1.5), the vLLM engine with
its defaults, `--requests` captioning requests at conservativeness 0.5 (contrastive decoding on) sent by
`--concurrency` clients in a closed loop. A request is "dissolved" when its telemetry says
`contrast_dissolved`: its two rows (main and contrast) were scheduled apart and part of its output was decoded
without contrast. `--stock-scheduler` runs vLLM's own scheduler instead of sevi/engines/vllm/plugin/scheduler.py
(what the engine did before it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

from bench.engines import PROMPT, images, random_llava, start
from sevi.engines.api import GenerationRequest, SamplingParams, user_message
from sevi.method.knob import resolve_alignment
from sevi.method.telemetry import Telemetry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF model folder (default: a random LLaVA)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--image-tokens", type=int, default=576, choices=[16, 144, 576])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stock-scheduler", action="store_true", help="vLLM's own scheduler (the engine before)")
    args = parser.parse_args(argv)

    model_dir = args.model or random_llava(args.layers, args.heads, args.kv_heads, args.image_tokens)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from sevi.engines.vllm.options import VllmOptions
    from sevi.engines.vllm.vllm_engine import VllmEngine

    fields: dict[str, Any] = {"engine_args": {"scheduler_cls": None} if args.stock_scheduler else {}}
    options = VllmOptions(**fields)  # the rest from SEVI_VLLM_* or defaults
    engine = start(VllmEngine(str(model_dir), model_name="bench", options=options))
    params = resolve_alignment(0.5, engine.num_layers)
    reqs = [
        GenerationRequest(
            f"pair-{i}",
            user_message(PROMPT),
            [img],
            params,
            SamplingParams(max_tokens=args.max_tokens, ignore_eos=True),
        )
        for i, img in enumerate(images(args.requests))
    ]

    async def run() -> list[Telemetry]:
        queue = list(reqs)
        found: list[Telemetry] = []

        async def client() -> None:
            while queue:
                req = queue.pop(0)
                telemetry = Telemetry()
                async for ev in engine.generate(req):
                    telemetry = ev.telemetry or telemetry
                found.append(telemetry)

        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        return found

    t0 = time.perf_counter()
    telemetry = asyncio.run(run())
    seconds = time.perf_counter() - t0
    dissolved = sum(1 for t in telemetry if t.contrast_dissolved)
    scheduler = "vLLM's stock scheduler" if args.stock_scheduler else "SeviScheduler"
    print(
        f"{scheduler}: {dissolved} of {len(telemetry)} requests dissolved "
        f"({args.requests} requests, {args.concurrency} at a time, {args.image_tokens} image tokens, "
        f"{args.max_tokens} tokens each, {seconds:.1f} s)"
    )
    asyncio.run(engine.stop())


if __name__ == "__main__":
    main()
