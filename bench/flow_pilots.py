"""Measure a pilot model's information flow with `bench.analyze` (issue 16, item 1) and file the figures.

    python -m bench.flow_pilots --model runs/pilot-sink/latest --name sink --note "LLaVA-1.5 system prompt"

`bench.analyze` on the first N counter-prior scenes of another seed than the held-out splits (so no
training or evaluation scene), kappa 0.2; per layer, the mean over those scenes of: the share of visual
information held by the text side, the current token's attention on the text side, semantic heads and
global heads. The summary gives each column's range over the upper half of the layers, the four columns
of `/work/shared/notes/tiny-training.md`, and whether the issue's targets hold there (visual information
> 0.5 and attention < 0.35 in every upper layer; global heads a real share of the semantic heads, taken
here as at least 0.1 of them and 5% of all heads). Results accumulate by name in
`bench/results/flow-pilots.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from bench.analyze import analyze
from sevi.engines.reference.generation import ReferenceModel
from training import scenes

COLUMNS = ("visual_info_text_side", "attention_text_side", "semantic_heads", "global_heads")
ANALYSIS_SEED = 4321  # not the held-out splits' seed (scenes.SEED): scenes nobody trained or evaluated on
RESULTS = Path("bench/results/flow-pilots.json")


def measure(model_dir: str | Path, n: int = 6, kappa: float = 0.2, max_tokens: int = 48) -> dict[str, Any]:
    model = ReferenceModel.load(str(model_dir))
    images = [scenes.make_scene("counter-prior", i, seed=ANALYSIS_SEED).image for i in range(n)]
    runs = [analyze(model, image, max_tokens=max_tokens, kappa=kappa) for image in images if image is not None]
    layers = len(runs[0]["layers"])
    per_layer = [
        {c: round(sum(r["layers"][li][c] for r in runs) / len(runs), 4) for c in COLUMNS} for li in range(layers)
    ]
    upper = per_layer[layers // 2 :]
    ranges = {c: [min(row[c] for row in upper), max(row[c] for row in upper)] for c in COLUMNS}
    global_of_semantic = [
        row["global_heads"] / row["semantic_heads"] if row["semantic_heads"] else 0.0 for row in upper
    ]
    targets = {
        "visual_info_over_half": all(row["visual_info_text_side"] > 0.5 for row in upper),
        "attention_under_0.35": all(row["attention_text_side"] < 0.35 for row in upper),
        # A ratio over almost no semantic heads says nothing: also at least 5% of all heads global.
        "global_real_share": min(global_of_semantic) >= 0.1 and all(row["global_heads"] >= 0.05 for row in upper),
    }
    return {
        "n": n,
        "kappa": kappa,
        "max_tokens": max_tokens,
        "upper_layers": [layers // 2, layers - 1],
        "upper_ranges": ranges,
        "global_share_of_semantic": [round(min(global_of_semantic), 3), round(max(global_of_semantic), 3)],
        "targets": targets,
        "per_layer": per_layer,
        "captions": [r["caption"] for r in runs],
    }


def row_text(name: str, result: dict[str, Any]) -> str:
    cols = " / ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in (result["upper_ranges"][c] for c in COLUMNS))
    met = sum(result["targets"].values())
    return f"{name}: {cols} (layers {result['upper_layers'][0]}-{result['upper_layers'][1]}; targets met {met}/3)"


def markdown(table: dict[str, dict[str, Any]]) -> str:
    """Every pilot in the results file as one table: the note's four columns and the targets met."""
    lines = [
        "| pilot | what changed | visual info, text side | attention, text side | semantic heads | "
        "global heads | targets met |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in table.items():
        cols = " | ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in (r["upper_ranges"][c] for c in COLUMNS))
        lines.append(f"| {name} | {r.get('note', '')} | {cols} | {sum(r['targets'].values())}/3 |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--note", default="", help="what the pilot changed, how long it trained")
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--kappa", type=float, default=0.2)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"note": args.note, "model": args.model, **measure(args.model, args.n, args.kappa, args.max_tokens)}
    run_json = Path(args.model).parent / "run.json"
    if run_json.exists():  # the pilot's own record: its variant, steps, size
        run = json.loads(run_json.read_text())
        result["run"] = {k: run.get(k) for k in ("variant", "model", "params", "args")}
    path = Path(args.results)
    table = json.loads(path.read_text()) if path.exists() else {}
    table[args.name] = result
    path.write_text(json.dumps(table, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(table))
    print(row_text(args.name, result))


if __name__ == "__main__":
    main()
