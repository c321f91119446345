"""vLLM engine vs the reference engine, and SEVI's cost inside vLLM. Prints one table; not a test.

    python -m bench.engines [--model DIR | --layers 8 --heads 16 [--image-tokens 576]] [--max-tokens 64]
                            [--repeats 3] [--threads 1] [--dtype bfloat16]

Same model, prompt and images, greedy decoding, both engines as the server runs them (the reference
engine is `TransformersEngine`, the vLLM engine `VllmEngine` with its defaults, torch.compile on), each
driven through its async `generate()`. Tokens/s = generated tokens / wall time of a workload:

- "lockstep": 8 requests of `--max-tokens` each, sent `concurrency` at a time, the next group once
  the last has finished. At concurrency 8 every request starts and ends together: the reference
  engine's best case (one static batch, no slot ever idle).
- "stream": 8 clients in a closed loop (each sends its next request when its last one finished) over
  24 requests whose lengths vary as captions do (max_tokens 16 to 128, fixed order). Slots free up at
  different times; this is what "concurrency 8" means for a server and where continuous batching counts.

Settings: the reference engine unaligned; inside vLLM "unaligned" (conservativeness 0), "aligned" with
explicit knobs that populate every head group on random models (omega 3, start layer 1, kappa 0.6),
and "aligned + contrast" (cross-image contrastive decoding, a second row per request).

The machine is shared and its load drifts, so every round runs every setting once, in turn (a drift
then hits all settings alike), after one warm-up round. Rates are the best of `--repeats` rounds;
ratios are also given as the median over rounds of the ratio within each round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sevi.engines.api import Engine, GenerationRequest, SamplingParams, user_message
from sevi.families import DEFAULT_PROMPT, eos_token_ids
from sevi.method.knob import AlignmentParams, resolve_alignment
from sevi.method.telemetry import Telemetry
from sevi.testing.tiny import build

PROMPT = DEFAULT_PROMPT  # the requests of every engine benchmark
LOCKSTEP_REQUESTS = 8
STREAM_LENGTHS = [
    16,
    96,
    48,
    128,
    32,
    80,
    64,
    112,
    24,
    56,
    104,
    40,
    120,
    72,
    88,
    16,
    64,
    128,
    32,
    96,
    48,
    112,
    80,
    24,
]  # 24 requests, mean 70 tokens


def images(n: int) -> list[Image.Image]:
    return [Image.fromarray((np.random.default_rng(s).random((40, 48, 3)) * 255).astype("uint8")) for s in range(n)]


def requests(lengths: list[int], params: AlignmentParams, tag: str) -> list[GenerationRequest]:
    # Every request runs to its max_tokens (EOS ignored): aligned and unaligned outputs differ, and a run whose
    # requests stop early does less work per step, which skewed the ratios (up to 16% fewer tokens).
    return [
        GenerationRequest(
            f"{tag}-{i}", user_message(PROMPT), [img], params, SamplingParams(max_tokens=n, ignore_eos=True)
        )
        for i, (img, n) in enumerate(zip(images(len(lengths)), lengths, strict=True))
    ]


async def _one(engine: Engine, req: GenerationRequest) -> int:
    n = 0
    async for ev in engine.generate(req):
        n = ev.completion_tokens
    return n


def collect(engine: Engine, reqs: list[GenerationRequest]) -> dict[str, tuple[list[int], Telemetry]]:
    """All requests sent at once; each one's generated ids (a closing EOS left out, as the reference engine
    reports them) and its telemetry."""

    async def one(req: GenerationRequest) -> tuple[list[int], Telemetry]:
        ids: list[int] = []
        telemetry = Telemetry()
        async for ev in engine.generate(req):
            if ev.token_id is not None and not (ev.finish_reason == "stop" and not ev.text):
                ids.append(ev.token_id)
            telemetry = ev.telemetry or telemetry
        return ids, telemetry

    async def all_() -> list[tuple[list[int], Telemetry]]:
        return await asyncio.gather(*(one(r) for r in reqs))

    return dict(zip([r.request_id for r in reqs], asyncio.run(all_()), strict=True))


def lockstep(engine: Engine, reqs: list[GenerationRequest], concurrency: int) -> int:
    async def all_() -> int:
        total = 0
        for i in range(0, len(reqs), concurrency):
            total += sum(await asyncio.gather(*(_one(engine, r) for r in reqs[i : i + concurrency])))
        return total

    return asyncio.run(all_())


def stream(engine: Engine, reqs: list[GenerationRequest], concurrency: int) -> int:
    async def all_() -> int:
        todo = list(reversed(reqs))

        async def client() -> int:
            n = 0
            while todo:
                n += await _one(engine, todo.pop())
            return n

        return sum(await asyncio.gather(*(client() for _ in range(concurrency))))

    return asyncio.run(all_())


def rate(run: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    tokens = run()
    return tokens / (time.perf_counter() - t0)


def random_llava(layers: int, heads: int, kv_heads: int, image_tokens: int = 16) -> Path:
    """A random LLaVA (head dim 32) in a temporary folder, with `image_tokens` (16, 144 or 576: LLaVA-1.5's
    336 px / 14) per image."""
    model_dir = Path(tempfile.mkdtemp(prefix="bench-llava-"))
    size, patch = {16: (32, 8), 144: (168, 14), 576: (336, 14)}[image_tokens]
    build("llava", model_dir, seed=0, layers=layers, heads=heads, kv_heads=kv_heads, image_size=size, patch=patch)
    return model_dir


def never_eos(model_dir: Path) -> Path:
    """Zero the EOS rows of a random model's output layer, so greedy decoding runs every request to its
    max_tokens also where the API has no `ignore_eos` (the HTTP benchmarks): a random model otherwise stops
    wherever its EOS logit happens to win, and aligned and unaligned requests then differ in length."""
    from safetensors.torch import load_file, save_file

    eos = eos_token_ids(json.loads((model_dir / "config.json").read_text()))  # the model's own, as the engines read it
    path = model_dir / "model.safetensors"
    weights = load_file(path)
    (name,) = [k for k in weights if k.endswith("lm_head.weight")]
    weights[name][torch.as_tensor(list(eos))] = 0.0
    save_file(weights, path, metadata={"format": "pt"})
    return model_dir


def start(engine: Engine) -> Engine:
    asyncio.run(engine.start())
    while not engine.ready:
        if engine.load_error:
            raise SystemExit(engine.load_error)
        time.sleep(0.1)
    return engine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="HF model folder (default: a random LLaVA built from --layers/--heads/--kv-heads, head dim 32)",
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument(
        "--image-tokens",
        type=int,
        default=16,
        choices=[16, 144, 576],
        help="image tokens per prompt of the random model (576: LLaVA-1.5's 336 px / 14)",
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request in the lockstep workload")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: leave torch's default); 1 gives the steadiest figures on a shared machine",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the reference engine (vLLM ratios only)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="weights and KV cache dtype of both engines (bfloat16: how large models fit on CPU)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        # Before vLLM starts: its CPU worker forbids set_num_threads afterwards.
        import torch

        torch.set_num_threads(args.threads)

    model_dir = args.model or random_llava(args.layers, args.heads, args.kv_heads, args.image_tokens)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from sevi.engines.reference.transformers_engine import TransformersEngine
    from sevi.engines.vllm.vllm_engine import VllmEngine

    t0 = time.perf_counter()
    vllm = start(VllmEngine(str(model_dir), model_name="bench", max_batch_size=8, dtype=args.dtype))
    vllm_start = time.perf_counter() - t0
    ref = (
        None
        if args.no_reference
        else start(TransformersEngine(str(model_dir), model_name="bench", max_batch_size=8, dtype=args.dtype))
    )
    layers = vllm.num_layers
    knobs = dict(omega=3.0, start_layer=1, kappa=0.6)
    variants = {
        "unaligned": resolve_alignment(0, layers),
        "aligned": resolve_alignment(None, layers, contrast=False, **knobs),  # type: ignore[arg-type]
        "aligned + contrast": resolve_alignment(None, layers, contrast=True, **knobs),  # type: ignore[arg-type]
    }
    fixed = [args.max_tokens] * LOCKSTEP_REQUESTS

    settings: list[tuple[str, Callable[[], int]]] = []

    def add(
        name: str,
        engine: Engine,
        workload: Callable[[Engine, list[GenerationRequest], int], int],
        lengths: list[int],
        params: AlignmentParams,
        conc: int,
    ) -> None:
        reqs = requests(lengths, params, name)
        settings.append((name, lambda: workload(engine, reqs, conc)))

    engines: list[tuple[str, Engine]] = [("vLLM", vllm)] + ([("reference", ref)] if ref is not None else [])
    for conc in (1, 8):
        for label, engine in engines:
            add(f"{label} lockstep c{conc} unaligned", engine, lockstep, fixed, variants["unaligned"], conc)
        for name in ("aligned", "aligned + contrast"):
            add(f"vLLM lockstep c{conc} {name}", vllm, lockstep, fixed, variants[name], conc)
    for label, engine in engines:
        add(f"{label} stream c8 unaligned", engine, stream, STREAM_LENGTHS, variants["unaligned"], 8)
    add("vLLM stream c8 aligned", vllm, stream, STREAM_LENGTHS, variants["aligned"], 8)

    for _, run in settings:  # warm-up
        run()
    rounds: list[dict[str, float]] = [{name: rate(run) for name, run in settings} for _ in range(args.repeats)]
    for _, engine in engines:
        asyncio.run(engine.stop())

    best = {name: max(r[name] for r in rounds) for name, _ in settings}
    print(
        f"model: {model_dir}  layers: {layers}  dtype: {args.dtype}  threads: {args.threads or 'default'}  greedy  "
        f"vLLM start: {vllm_start:.0f} s  (tokens/s, best of {args.repeats} interleaved rounds)"
    )
    for name, _ in settings:
        print(f"  {name:<40} {best[name]:8.1f}   rounds: {' '.join(f'{r[name]:.0f}' for r in rounds)}")

    def ratio(num: str, den: str, label: str, target: str = "") -> None:
        median = statistics.median(r[num] / r[den] for r in rounds)
        print(f"  {label:<48} best {best[num] / best[den]:.2f}x, median per round {median:.2f}x{target}")

    if ref is not None:
        for conc in (1, 8):
            ratio(
                f"vLLM lockstep c{conc} unaligned",
                f"reference lockstep c{conc} unaligned",
                f"vLLM / reference, lockstep, concurrency {conc}",
                "  (target >= 3)" if conc == 8 else "",
            )
        ratio(
            "vLLM stream c8 unaligned",
            "reference stream c8 unaligned",
            "vLLM / reference, stream, concurrency 8",
            "  (target >= 3)",
        )
    for conc in (1, 8):
        for name in ("aligned", "aligned + contrast"):
            ratio(
                f"vLLM lockstep c{conc} {name}",
                f"vLLM lockstep c{conc} unaligned",
                f"vLLM {name} / unaligned, lockstep, c{conc}",
                "  (target >= 0.85)" if name == "aligned" else "",
            )
    ratio(
        "vLLM stream c8 aligned",
        "vLLM stream c8 unaligned",
        "vLLM aligned / unaligned, stream, c8",
        "  (target >= 0.85)",
    )


if __name__ == "__main__":
    main()
