"""`python -m bench.chair`: score a captions file, caption a labelled set through a live server (`run`,
`compare`), or calibrate a model's knob presets (`calibrate`). Each subcommand's module adds its parser."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bench.chair.calibrate import add_calibrate_command
from bench.chair.run import add_run_command
from bench.chair.score import compute_chair, load_captions, load_truth


def _cmd_score(args: argparse.Namespace) -> int:
    result = compute_chair(load_captions(args.captions), load_truth(args.truth))
    out = result.summary() if args.summary_only else result.to_json()
    json.dump(out, sys.stdout, indent=None if args.compact else 1)
    sys.stdout.write("\n")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The parser with every subcommand, and its subparsers action."""
    parser = argparse.ArgumentParser(prog="python -m bench.chair", description="CHAIR hallucination metric")
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score a captions JSONL file against a truth JSON file")
    score.add_argument("--captions", required=True, help='JSON lines: {"image_id": ..., "caption": ...}')
    score.add_argument("--truth", required=True, help="JSON: image_id -> list of COCO category names")
    score.add_argument("--summary-only", action="store_true", help="leave out the per-image details")
    score.add_argument("--compact", action="store_true", help="print on one line")
    score.set_defaults(func=_cmd_score)
    add_run_command(sub)  # the evaluation through a live server
    add_calibrate_command(sub)  # the knob's presets, measured through a live server
    return parser, sub


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # calibrate records its own command line in the presets it writes
    return int(args.func(args))
