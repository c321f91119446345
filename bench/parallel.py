"""SEVI on two vLLM workers against the reference engine: how many greedy requests give its tokens. Not a test.

    python -m bench.parallel [--tensor-parallel 2 | --pipeline-parallel 2] [--aligned 8] [--unaligned 4]

A random LLaVA (default 8 layers, 4 heads, as in the issue that found tensor parallelism wrong), the vLLM
engine with vLLM's `mp` executor (one core per worker: VLLM_CPU_OMP_THREADS_BIND="0|1", set here unless
given), `--aligned` requests with SEVI on (omega 3 from layer 1, kappa 0.6, which populates every head group
of a random model; no contrastive decoding) and `--unaligned` with it off, all sent at once, greedy. Prints
how many of each equal the reference engine token for token, how many of the aligned ones the alignment
changed (else the comparison says nothing), and how many report the reference engine's telemetry.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from bench.engines import PROMPT, collect, images, random_llava, start
from sevi.engines.api import GenerationRequest, SamplingParams, user_message
from sevi.engines.reference.generation import ReferenceModel, run_to_completion
from sevi.method.knob import resolve_alignment


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--pipeline-parallel", type=int, default=1)
    parser.add_argument("--aligned", type=int, default=8)
    parser.add_argument("--unaligned", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    if args.tensor_parallel * args.pipeline_parallel == 1:
        parser.error("give --tensor-parallel or --pipeline-parallel above 1")

    model_dir = random_llava(args.layers, args.heads, args.kv_heads)
    workers = args.tensor_parallel * args.pipeline_parallel
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1)) for i in range(workers)))
    from sevi.engines.vllm.options import VllmOptions
    from sevi.engines.vllm.vllm_engine import VllmEngine

    fields: dict[str, Any] = dict(
        distributed_executor_backend="mp",
        tensor_parallel_size=args.tensor_parallel,
        pipeline_parallel_size=args.pipeline_parallel,
    )
    engine = start(VllmEngine(str(model_dir), model_name="bench", options=VllmOptions(**fields)))
    on = resolve_alignment(None, engine.num_layers, omega=3.0, start_layer=1, kappa=0.6, contrast=False)
    off = resolve_alignment(0, engine.num_layers)
    pictures = images(args.aligned + args.unaligned)
    reqs = [
        GenerationRequest(
            f"{'on' if i < args.aligned else 'off'}-{i}",
            user_message(PROMPT),
            [img],
            on if i < args.aligned else off,
            SamplingParams(max_tokens=args.max_tokens),
        )
        for i, img in enumerate(pictures)
    ]

    t0 = time.perf_counter()
    got = collect(engine, reqs)
    seconds = time.perf_counter() - t0
    asyncio.run(engine.stop())
    ref = ReferenceModel.load(model_dir)
    want = run_to_completion(ref, reqs)
    plain = run_to_completion(
        ref, [GenerationRequest(r.request_id, r.messages, r.images, off, r.sampling) for r in reqs]
    )  # what each would give with SEVI off
    counts = {"on": [0, 0, 0, 0], "off": [0, 0, 0, 0]}  # equal, of, changed by SEVI, telemetry equal
    for r in reqs:
        kind = r.request_id.split("-")[0]
        ids, telemetry = got[r.request_id]
        w = want[r.request_id]
        counts[kind][0] += ids == w.token_ids
        counts[kind][1] += 1
        counts[kind][2] += w.token_ids != plain[r.request_id].token_ids
        counts[kind][3] += telemetry == w.telemetry
    layout = f"TP {args.tensor_parallel} x PP {args.pipeline_parallel}"
    print(
        f"{layout}, random LLaVA {args.layers} layers x {args.heads} heads ({args.kv_heads} KV), "
        f"{args.max_tokens} tokens, {seconds:.1f} s: aligned requests equal to the reference engine "
        f"{counts['on'][0]} of {counts['on'][1]} (SEVI changed {counts['on'][2]} of them; telemetry equal "
        f"{counts['on'][3]}), unaligned {counts['off'][0]} of {counts['off'][1]}"
    )


if __name__ == "__main__":
    main()
