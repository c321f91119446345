"""gpu-check's engine tier: the vLLM engine with SEVI on a GPU, against the reference engine and stock vLLM.

    python -m bench.gpu_engine_tier [--device cuda] [--width llava-1.5-7b] [--layers 2] [--out report.json]
    python -m bench.gpu_engine_tier --device cpu --width tiny --dtype float32 --no-throughput   # the CPU smoke

Where vLLM is installed next to a GPU (a user's GPU server; `make gpu-check` runs it when vLLM imports):
1. A random LLaVA of LLaVA-1.5-7B's decoder width (hidden 4096, 32 heads of 128, MLP 11008; few layers) with
   576 image tokens per image (336 px / 14), bf16, built on the spot (nothing downloaded).
2. Agreement: a mixed batch (conservativeness 0, 0.5 with contrast, 1 without, explicit knobs that populate
   every head group with and without contrast), greedy, all sent at once to the vLLM engine and run by the
   reference engine; per request whether the tokens are equal, the length of their common prefix, and whether
   the telemetry is. In float32 on a CPU they are equal (the engine tests); in bf16 on a GPU FlashAttention
   and the reference engine's attention round differently, so the unaligned requests (c = 0) are the control:
   the aligned ones should agree as often.
3. Throughput (bench/vs_vllm.py, two servers on the same GPU, half its memory each): stock vLLM's own server
   against sevi-serve at conservativeness 0 and 0.5 (no contrast), at concurrency 1, 8 and 32: the ratios
   sevi-serve c=0 / stock and aligned (c=0.5) / unaligned (c=0).
Targets (issue 14): aligned / unaligned >= 0.95x at concurrency 1 and >= 0.90x at 32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.engines import PROMPT, collect, images, never_eos, start
from sevi.engines.api import GenerationRequest, SamplingParams, user_message
from sevi.engines.reference.generation import ReferenceModel, run_to_completion
from sevi.method.knob import AlignmentParams, resolve_alignment
from sevi.testing.tiny import build

# Decoder widths: LLaVA-1.5-7B's, and the tiny models' (the CPU smoke test).
WIDTHS: dict[str, dict[str, int]] = {
    "llava-1.5-7b": {"heads": 32, "head_dim": 128, "intermediate_size": 11008},
    "tiny": {"heads": 4, "head_dim": 32},
}
IMAGES = {576: (336, 14), 16: (32, 8)}  # image tokens -> (image size, patch)
# Omega 3 from layer 1 with kappa 0.6 populates every head group of the random models
# (tests/support/engines.py, EXPLICIT).
EXPLICIT: dict[str, Any] = {"omega": 3.0, "start_layer": 1, "kappa": 0.6}


def build_model(width: str, layers: int, image_tokens: int) -> Path:
    model_dir = Path(tempfile.mkdtemp(prefix=f"gpu-tier-{width}-"))
    size, patch = IMAGES[image_tokens]
    build("llava", model_dir, seed=0, layers=layers, image_size=size, patch=patch, max_positions=4096, **WIDTHS[width])
    return model_dir


def knobs(layers: int) -> dict[str, AlignmentParams]:
    # start_layer 1 needs two layers at least; with one, every knob starts at layer 0.
    explicit = dict(EXPLICIT, start_layer=min(1, layers - 1))
    return {
        "c0": resolve_alignment(0, layers),
        "c0.5+cd": resolve_alignment(0.5, layers, contrast=True),
        "c1": resolve_alignment(1.0, layers, contrast=False),
        "explicit": resolve_alignment(None, layers, contrast=False, **explicit),
        "explicit+cd": resolve_alignment(None, layers, contrast=True, **explicit),
    }


def agreement(engine: Any, ref: ReferenceModel, layers: int, n_images: int, max_tokens: int) -> dict[str, Any]:
    """The vLLM engine against the reference engine on one mixed batch, per knob setting."""
    reqs = [
        GenerationRequest(f"{name}/{i}", user_message(PROMPT), [img], params, SamplingParams(max_tokens=max_tokens))
        for i, img in enumerate(images(n_images))
        for name, params in knobs(layers).items()
    ]
    got = collect(engine, reqs)
    want = run_to_completion(ref, reqs)
    by_knob: dict[str, dict[str, Any]] = {}
    for r in reqs:
        name = r.request_id.split("/")[0]
        ids, telemetry = got[r.request_id]
        ref_ids = want[r.request_id].token_ids
        prefix = next(
            (k for k, (a, b) in enumerate(zip(ids, ref_ids, strict=False)) if a != b), min(len(ids), len(ref_ids))
        )
        row = by_knob.setdefault(
            name,
            {
                "requests": 0,
                "equal": 0,
                "telemetry_equal": 0,
                "common_prefix": [],
                "stage1_rows": 0,
                "contrast_steps": 0,
            },
        )
        row["requests"] += 1
        row["equal"] += ids == ref_ids
        row["telemetry_equal"] += ids == ref_ids and telemetry == want[r.request_id].telemetry
        row["common_prefix"].append(f"{prefix}/{len(ref_ids)}")
        row["stage1_rows"] += telemetry.stage1_rows
        row["contrast_steps"] += telemetry.contrast_steps
    control = by_knob["c0"]["equal"] / by_knob["c0"]["requests"]
    aligned = [v["equal"] / v["requests"] for k, v in by_knob.items() if k != "c0"]
    return {
        "by_knob": by_knob,
        "unaligned_equal_share": round(control, 3),
        "aligned_equal_share_min": round(min(aligned), 3),
        "pass": min(aligned) >= control and by_knob["explicit"]["stage1_rows"] > 0,
    }


def throughput(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """bench.vs_vllm in a subprocess (it starts both servers): stock vLLM and sevi-serve at c = 0 and 0.5."""
    out = Path(tempfile.mkdtemp(prefix="gpu-tier-vs-")) / "vs_vllm.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.vs_vllm",
        "--model",
        str(model_dir),
        "--dtype",
        args.dtype,
        "--concurrency",
        args.concurrency,
        "--sevi-levels",
        "0,0.5",
        "--rounds",
        str(args.rounds),
        "--max-tokens",
        str(args.max_tokens),
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-model-len",
        "2048",
        "--gpu-memory-utilization",
        "0.4",
        "--json",
        str(out),
    ]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    found: dict[str, Any] = json.loads(out.read_text())
    rows = found["summary"]
    return {
        "summary": rows,
        "targets": {
            "aligned_over_unaligned_at_1": next(
                (r["ratios"].get("sevi c=0.5 / sevi c=0") for r in rows if r["concurrency"] == 1), None
            ),
            "target_at_1": 0.95,
            "aligned_over_unaligned_at_32": next(
                (r["ratios"].get("sevi c=0.5 / sevi c=0") for r in rows if r["concurrency"] == 32), None
            ),
            "target_at_32": 0.90,
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--width", default="llava-1.5-7b", choices=sorted(WIDTHS))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--image-tokens", type=int, default=576, choices=sorted(IMAGES))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--images", type=int, default=2, help="images in the agreement batch (5 requests each)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--no-throughput", action="store_true", help="the agreement part only")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("the engine tier needs a CUDA GPU here (or --device cpu for the smoke run)", file=sys.stderr)
        raise SystemExit(2)
    started = time.time()
    model_dir = build_model(args.width, args.layers, args.image_tokens)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from sevi.engines.vllm.options import VllmOptions
    from sevi.engines.vllm.vllm_engine import VllmEngine

    engine = start(
        VllmEngine(
            str(model_dir),
            model_name="gpu-tier",
            dtype=args.dtype,
            max_batch_size=16,
            options=VllmOptions(
                max_model_len=2048,
                gpu_memory_utilization=0.5,  # type: ignore[call-arg]
                enforce_eager=args.device == "cpu",
            ),
        )
    )
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    ref = ReferenceModel.load(model_dir, dtype=dtype, device=args.device)
    report: dict[str, Any] = {
        "model": {
            "width": args.width,
            **WIDTHS[args.width],
            "layers": args.layers,
            "image_tokens": args.image_tokens,
            "dtype": args.dtype,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        },
        "agreement": agreement(engine, ref, args.layers, args.images, args.max_tokens),
    }
    asyncio.run(engine.stop())
    del ref
    if not args.no_throughput:  # every request to its max_tokens from here on (the agreement ran first)
        report["throughput"] = throughput(never_eos(model_dir), args)
    report["seconds"] = round(time.time() - started, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
