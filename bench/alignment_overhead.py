"""Decode speed of the reference engine with the alignment off, on, and on with contrastive decoding.

    python -m bench.alignment_overhead [--model DIR | --size tiny|medium] [--tokens 64] [--repeats 3] [--threads N]

Prints decode tokens/s (prefill excluded) at batch 1 and 8 for conservativeness 0, 0.5 without contrast
and 0.5 with contrast, and each one's ratio to conservativeness 0 measured in the same run. Without
--model it builds a random LLaVA in a temp folder: --size tiny (8 layers x 8 heads of 32, hidden 256)
or medium (8 layers x 32 heads of 32, hidden 1024, GQA 4:1). Targets (issue 2):
aligned without contrast >= 0.85x, with contrast >= 0.45x.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sevi.engines.api import GenerationRequest, SamplingParams, user_message
from sevi.engines.reference.generation import ReferenceModel
from sevi.method.knob import resolve_alignment
from sevi.testing.tiny import build

# Random LLaVAs: per-op dispatch dominates the tiny one; the medium one shows how the overhead shrinks as
# the matrix work grows (head_dim 32 either way, as vLLM's CPU kernel allows).
SIZES = {
    "tiny": {"layers": 8, "heads": 8, "kv_heads": 8, "image_size": 48, "patch": 8},
    "medium": {"layers": 8, "heads": 32, "kv_heads": 8, "image_size": 48, "patch": 8},
}

SETTINGS = [
    ("c=0 (off)", 0.0, False),
    ("c=0.5 no contrast", 0.5, False),
    ("c=0.5 + contrast", 0.5, True),
]


def _image(seed: int):  # noqa: ANN202 - PIL image
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((48, 48, 3)) * 255).astype("uint8"))


def decode_tokens_per_s(
    model: ReferenceModel, c: float, contrast: bool, batch: int, tokens: int, clock: str = "wall"
) -> float:
    params = resolve_alignment(c, model.num_layers, contrast=contrast)
    requests = [
        GenerationRequest(
            f"r{i}",
            user_message("please describe this image"),
            [_image(i)],
            params,
            SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True),
        )
        for i in range(batch)
    ]
    now = time.process_time if clock == "cpu" else time.perf_counter
    running = model.start(requests)  # prefill happens here, outside the timed region
    start = now()
    produced = 0
    while not running.done:
        produced += sum(1 for ev in running.step() if ev.token_id is not None)
    return produced / (now() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: a random LLaVA of --size)")
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="tiny",
        help="random LLaVA to build when no --model: tiny (hidden 256) or medium (hidden 1024)",
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="best of N per cell, interleaved")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this process's CPU time, steadier on a shared machine (use with --threads 1)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else Path(tmp) / "tiny-llava"
        if not args.model:
            build("llava", folder, **SIZES[args.size])
        model = ReferenceModel.load(folder)
        print(
            f"model: {args.size if not args.model else folder}  layers={model.num_layers}  "
            f"tokens/request={args.tokens}  threads={torch.get_num_threads()}  clock={args.clock}"
        )
        # Sampled decoding so every request runs the full length (no early EOS), the same for every setting.
        decode_tokens_per_s(model, 0.0, False, 2, 4)  # warm-up
        print(f"{'batch':>5}  {'setting':<20} {'tok/s':>9} {'ratio to off':>13}")
        for batch in (1, 8):
            # Interleave the settings within each repeat so that load drift hits all of them alike.
            best = [0.0] * len(SETTINGS)
            for _ in range(args.repeats):
                for i, (_, c, contrast) in enumerate(SETTINGS):
                    rate = decode_tokens_per_s(model, c, contrast, batch, args.tokens, args.clock)
                    best[i] = max(best[i], rate)
            for (label, _, _), rate in zip(SETTINGS, best, strict=True):
                print(f"{batch:>5}  {label:<20} {rate:>9.1f} {rate / best[0]:>12.2f}x")


if __name__ == "__main__":
    main()
