"""Caption one image from the command line, offline, with the reference engine.

python -m sevi.engines.reference.generate --model DIR --image PATH [--prompt TEXT] [--max-tokens N]
    [--conservativeness C | --preset NAME] [--omega W --start-layer L --kappa K] [--contrast on|off]
    [--contrast-image PATH] [--temperature T --top-p P --seed S] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from PIL import Image

from sevi.engines.api import GenerationRequest, RequestError, SamplingParams, user_message
from sevi.engines.reference.generation import ReferenceModel, run_to_completion
from sevi.families import DEFAULT_PROMPT
from sevi.method.knob import PRESET_NAMES, AlignmentParamError, PresetsError, load_knob_map, resolve_alignment


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sevi.engines.reference.generate", description="Caption one image with SEVI."
    )
    p.add_argument("--model", required=True, help="local Hugging Face model folder")
    p.add_argument("--image", required=True, help="image file to caption")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=64)
    knob = p.add_mutually_exclusive_group()
    knob.add_argument("--conservativeness", type=float, help="0 = unmodified model ... 1 = most cautious")
    knob.add_argument("--preset", choices=sorted(PRESET_NAMES), help="named setting instead of a number")
    p.add_argument("--omega", type=float, help="override the alignment strength")
    p.add_argument("--start-layer", type=int, help="override the first aligned layer (0-based)")
    p.add_argument("--kappa", type=float, help="override the core-head threshold")
    p.add_argument("--contrast", choices=("on", "off"), help="contrastive decoding (default: on when c > 0)")
    p.add_argument("--contrast-image", help="fix the contrast image instead of drawing one from the pool")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    # Input errors first: they should not wait for the weights to load.
    if args.max_tokens < 1:
        raise RequestError("--max-tokens must be at least 1", "max_tokens")
    image = Image.open(args.image).convert("RGB")
    contrast = [Image.open(args.contrast_image).convert("RGB")] if args.contrast_image else None
    knob_map = load_knob_map(args.model)  # the folder's presets, as the server reads them (a bad file: before loading)
    model = ReferenceModel.load(args.model)
    knob = args.preset if args.preset is not None else args.conservativeness
    alignment = resolve_alignment(
        knob,
        model.num_layers,
        omega=args.omega,
        start_layer=args.start_layer,
        kappa=args.kappa,
        contrast=None if args.contrast is None else args.contrast == "on",
        knob_map=knob_map,
    )
    request = GenerationRequest(
        request_id="cli",
        messages=user_message(args.prompt),
        images=[image],
        alignment=alignment,
        sampling=SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        ),
        contrast_images=contrast,
    )
    result = run_to_completion(model, [request])["cli"]
    return {
        "text": result.text,
        "prompt_token_ids": result.prompt_token_ids,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "alignment": alignment.to_dict(),
        "telemetry": result.telemetry.as_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except (AlignmentParamError, PresetsError, RequestError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out) if args.json else out["text"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
