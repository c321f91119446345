"""`python -m bench.chair calibrate`: measure a model's knob frontier through a live server and write its presets.

    python -m bench.chair calibrate --server http://127.0.0.1:8000 --split counter-prior in-prior --limit 100 \\
        [--omegas 0.5,1,2,4] [--start-layers 1,2,4] [--kappas 0.2,0.5] [--contrast on|off] \\
        --out runs/calibrate [--presets models/bundled/sevi_presets.json]

Every setting of the grid (explicit omega, start layer and kappa, contrast as chosen; with contrast on,
also contrast alone at omega 0) and the unmodified model (conservativeness 0) caption the labelled set
greedily (the scene splits, together, or a local COCO folder as `run --coco` reads it). Each setting
gets CHAIR_S and recall over the whole set. The frontier is the settings no other setting beats on both
(lower CHAIR_S, higher recall); those with a lower CHAIR_S than the unmodified model, in decreasing
CHAIR_S, become the knots of the presets file, with c = the share of the largest measured cut in CHAIR_S
that the knot achieves: c = 0 is the unmodified model, c = 1 the frontier's least hallucinating setting,
and CHAIR_S falls (recall too) as c rises. `balanced` is the knot nearest c = 0.5, `focused` c = 1.
Where no setting lowers CHAIR_S, no file is written (exit 1): the knob would have nothing to walk.

The server's own map does not matter (every request names its parameters). Captions go to
`OUT/captions/calibrate-<set>-<setting>.jsonl` as they arrive, so an interrupted calibration resumes;
the measured points go to `OUT/calibrate-<set>-contrast-<on|off>.json` (and `.md`), the frontier plot to
`.png`, the presets to `--presets` (default `OUT/sevi_presets.json`): copy it into the model folder and
restart the server to serve it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.chair.run import Item, coco_items, run_level, scene_items, summarize
from sevi.families import DEFAULT_PROMPT
from sevi.method.knob import PRESETS_FILE, parse_presets


@dataclass(frozen=True)
class Setting:
    omega: float
    start_layer: int
    kappa: float

    @property
    def name(self) -> str:
        return (
            "off"
            if self.omega == 0 and self.start_layer < 0
            else f"w{self.omega:g}-s{self.start_layer}-k{self.kappa:g}"
        )


OFF = Setting(0.0, -1, 0.0)  # the unmodified model (conservativeness 0); its layer and kappa mean nothing


@dataclass(frozen=True)
class Measured:
    setting: Setting
    hallucination: float  # CHAIR_S (or CHAIR_I, --metric) over the set
    recall: float
    row: dict[str, Any]


def frontier(points: list[Measured]) -> list[Measured]:
    """The points no other point beats on both hallucination (lower) and recall (higher), most hallucinating
    first."""

    def key(p: Measured) -> tuple[float, float]:
        return (p.hallucination, p.recall)

    def beaten(p: Measured) -> bool:
        return any(q.hallucination <= p.hallucination and q.recall >= p.recall and key(q) != key(p) for q in points)

    front = [p for p in points if not beaten(p)]
    # Equal measurements: keep one, the gentlest setting (sorted last, so it overwrites the others).
    unique = {key(p): p for p in sorted(front, key=_gentleness)}
    return sorted(unique.values(), key=lambda p: (-p.hallucination, -p.recall))


def _gentleness(p: Measured) -> tuple[float, int, float]:
    """Larger = gentler: a smaller omega, a later start layer, a smaller kappa."""
    return (-p.setting.omega, p.setting.start_layer, -p.setting.kappa)


def walk(baseline: Measured, points: list[Measured], min_step: float = 0.0) -> list[tuple[float, Measured]]:
    """(c, point) from the unmodified model (c = 0) along the frontier's points that hallucinate less (c up to 1).

    c is the share of the largest measured cut that the point achieves, so c walks the frontier monotonically:
    hallucination strictly falls as c rises. `min_step`: each knot must hallucinate at least that much less than
    the one before (differences within noise make no knot); the least hallucinating point always ends the walk.
    Empty when nothing hallucinates less than the unmodified model by `min_step`."""
    below = [p for p in frontier([baseline, *points]) if p.hallucination < baseline.hallucination]
    kept: list[Measured] = []
    for p in below:
        if (kept[-1] if kept else baseline).hallucination - p.hallucination >= min_step:
            kept.append(p)
    if not kept:
        return []
    if kept[-1] is not below[-1]:
        # Too close to the last knot to be a step of its own: it replaces that knot (a larger step from the one
        # before, so the rule still holds).
        if kept[-1].hallucination - below[-1].hallucination < min_step:
            kept.pop()
        kept.append(below[-1])
    top, bottom = baseline.hallucination, kept[-1].hallucination
    return [(0.0, baseline)] + [(round((top - p.hallucination) / (top - bottom), 4), p) for p in kept]


def presets_document(
    steps: list[tuple[float, Measured]], contrast: bool, calibration: dict[str, Any]
) -> dict[str, Any]:
    """The presets file for a walk (`sevi.method.knob` schema): knots, balanced = the knot nearest c = 0.5."""
    first = steps[1][1].setting
    knots = []
    for c, p in steps:
        # The unmodified model's knot borrows the first real knot's layer and kappa: from c = 0 to that knot
        # only omega ramps up.
        s = first if p.setting == OFF else p.setting
        knots.append(
            {
                "c": c,
                "omega": 0.0 if p.setting == OFF else s.omega,
                "start_layer": s.start_layer,
                "kappa": s.kappa,
                "measured": {k: p.row[k] for k in ("chair_s", "chair_i", "recall", "len")},
            }
        )
    inner = [c for c, _ in steps[1:-1]]
    balanced = min(inner, key=lambda c: abs(c - 0.5)) if inner else 0.5
    return {
        "format": 1,
        "balanced": balanced,
        "focused": 1.0,
        "contrast": contrast,
        "knots": knots,
        "calibration": calibration,
    }


def grid(omegas: list[float], layers: list[int], kappas: list[float], contrast: bool) -> list[Setting]:
    settings = [Setting(w, s, k) for w in omegas for s in layers for k in kappas]
    if contrast:  # contrastive decoding alone is a point of the frontier too
        settings.insert(0, Setting(0.0, min(layers), kappas[0]))
    return settings


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _model_info(client: httpx.Client) -> tuple[str, int]:
    card = client.get("/v1/models").raise_for_status().json()["data"][0]
    if card.get("num_layers") is None:
        raise SystemExit("the server's model is not loaded yet (GET /v1/models has no num_layers); retry when /ready")
    return str(card["id"]), int(card["num_layers"])


def plot(
    name: str,
    points: list[Measured],
    steps: list[tuple[float, Measured]],
    path: Path,
    metric: str = "chair_s",
    error: float | None = None,
) -> None:
    """Every setting measured, the frontier (dashed), the knots the presets walk (red); `error`: the standard
    error of the unmodified model's measure, drawn as its horizontal bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([p.hallucination for p in points], [p.recall for p in points], s=14, c="0.6", label="settings measured")
    base = next(p for p in points if p.setting == OFF)
    ax.scatter(
        [base.hallucination], [base.recall], marker="*", s=140, c="k", label="unmodified model (c = 0)", zorder=3
    )
    if error:
        ax.errorbar(
            [base.hallucination], [base.recall], xerr=[error], c="k", capsize=3, lw=1, label="+-1 standard error"
        )
    front = frontier(points)
    ax.plot(
        [p.hallucination for p in front], [p.recall for p in front], "--", c="tab:blue", lw=1, label="measured frontier"
    )
    if steps:
        ax.plot(
            [p.hallucination for _, p in steps],
            [p.recall for _, p in steps],
            "o-",
            c="tab:red",
            label="knots of the presets (c walks them)",
            zorder=2,
        )
        for c, p in steps[1:]:
            ax.annotate(
                f"c={c:.2f}\n{p.setting.name}",
                (p.hallucination, p.recall),
                fontsize=6,
                textcoords="offset points",
                xytext=(4, 4),
            )
    ax.set_xlabel(f"{metric.upper()} (lower is better)")
    ax.set_ylabel("recall")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(title: str, points: list[Measured], steps: list[tuple[float, Measured]]) -> str:
    on_walk = {id(p): c for c, p in steps}
    cols = ["chair_s", "chair_i", "recall", "len", "stage1_share", "stage2_share"]
    lines = [f"### {title}", "", "| setting | c | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for p in sorted(points, key=lambda q: (-q.hallucination, -q.recall)):
        c = on_walk.get(id(p))
        lines.append(
            f"| {p.setting.name} | {'' if c is None else f'{c:g}'} | "
            + " | ".join(str(p.row.get(k, "")) for k in cols)
            + " |"
        )
    return "\n".join(lines) + "\n"


def cmd_calibrate(args: argparse.Namespace) -> int:
    contrast = args.contrast == "on"
    items: list[Item]
    if args.coco:
        items, name, partners = coco_items(Path(args.coco), args.limit), "coco", False
    else:
        items = [it for split in args.split for it in scene_items(split, args.limit)]
        name, partners = "+".join(args.split), "counter-prior" in args.split
    out = Path(args.out)
    (out / "captions").mkdir(parents=True, exist_ok=True)
    tag = f"calibrate-{name}-contrast-{args.contrast}"
    result_tag = tag + ("" if args.metric == "chair_s" else f"-{args.metric}")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    points: list[Measured] = []
    with httpx.Client(base_url=args.server, timeout=args.timeout, headers=headers) as client:
        model_id, depth = _model_info(client)
        layers = (
            [int(x) for x in args.start_layers.split(",")]
            if args.start_layers
            else sorted({max(0, round(depth * f)) for f in (1 / 8, 1 / 4, 1 / 2)})
        )
        if any(not 0 <= s <= depth for s in layers):
            raise SystemExit(f"start layers must be in [0, {depth}] for this model, got {layers}")
        for setting in [OFF, *grid(_floats(args.omegas), layers, _floats(args.kappas), contrast)]:
            level, extra = (
                (0.0, None)
                if setting == OFF
                else (1.0, {"omega": str(setting.omega), "start_layer": str(setting.start_layer)})
            )
            rows = run_level(
                client,
                items,
                level,
                contrast,
                out / "captions" / f"{tag}-{setting.name}.jsonl",
                args.max_tokens,
                args.prompt,
                args.concurrency,
                f"{name} {setting.name}",
                None if setting == OFF else setting.kappa,
                extra,
            )
            row = summarize(items, rows, partners)
            points.append(Measured(setting, row[args.metric], row["recall"], row))
    steps = walk(points[0], points[1:], args.min_step)
    # The scale of chance: differences between settings much below this are noise, however the walk orders them.
    base_s = points[0].row["chair_s"]
    chair_s_se = round(math.sqrt(base_s * (1 - base_s) / max(1, len(items))), 4)
    title = f"{name}, contrast {args.contrast}, n={len(items)}, model {model_id}, frontier on {args.metric}"
    result = {
        "set": name,
        "n": len(items),
        "contrast": contrast,
        "max_tokens": args.max_tokens,
        "model": model_id,
        "metric": args.metric,
        "chair_s_standard_error": chair_s_se,
        "num_layers": depth,
        "points": [{**asdict(p.setting), "name": p.setting.name, **p.row} for p in points],
        "walk": [{"c": c, "setting": p.setting.name} for c, p in steps],
    }
    (out / f"{result_tag}.json").write_text(json.dumps(result, indent=1))
    (out / f"{result_tag}.md").write_text(
        markdown(title, points, steps) + f"\nStandard error of the unmodified model's CHAIR_S: {chair_s_se}.\n"
    )
    plot(
        f"{name}, contrast {args.contrast}, n={len(items)}\nmodel {model_id}, frontier on {args.metric}",
        points,
        steps,
        out / f"{result_tag}.png",
        args.metric,
        chair_s_se if args.metric == "chair_s" else None,
    )
    print((out / f"{result_tag}.md").read_text())
    if not steps:
        print(
            f"no setting lowered {args.metric.upper()} below the unmodified model's ({points[0].hallucination}) "
            f"by {args.min_step} or more: no presets written; the knob would have nothing to walk on this model",
            file=sys.stderr,
        )
        return 1
    calibration = {
        "command": "python -m bench.chair " + " ".join(args.argv),
        "set": name,
        "n": len(items),
        "max_tokens": args.max_tokens,
        "prompt": args.prompt,
        "model": model_id,
        "metric": args.metric,
        "min_step": args.min_step,
        "chair_s_standard_error": chair_s_se,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "note": f"c = share of the largest measured {args.metric.upper()} cut; knots' `measured` are over the set",
    }
    doc = presets_document(steps, contrast, calibration)
    parse_presets(doc, num_layers=depth)  # never write a file the server would refuse
    target = Path(args.presets) if args.presets else out / PRESETS_FILE
    target.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"presets: {target} ({len(steps)} knots; balanced c = {doc['balanced']:g})")
    return 0


def add_calibrate_command(sub: Any) -> None:
    cal = sub.add_parser(
        "calibrate",
        help="sweep SEVI settings through a live server, draw the CHAIR_S / recall "
        "frontier and write the model's knob presets",
    )
    source = cal.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--split",
        nargs="+",
        choices=("in-prior", "counter-prior", "hard"),
        help="synthetic scene splits, measured together",
    )
    source.add_argument("--coco", help="local COCO folder (val2014/ and annotations/)")
    cal.add_argument("--server", default="http://127.0.0.1:8000")
    cal.add_argument("--api-key")
    cal.add_argument("--omegas", default="0.5,1,2,4")
    cal.add_argument("--start-layers", help="comma list (default: 1/8, 1/4 and 1/2 of the depth)")
    cal.add_argument("--kappas", default="0.2,0.5")
    cal.add_argument(
        "--contrast",
        choices=("on", "off"),
        default="on",
        help="contrastive decoding in every setting but the unmodified model (and the presets' default)",
    )
    cal.add_argument(
        "--metric",
        choices=("chair_s", "chair_i"),
        default="chair_s",
        help="hallucination measure of the frontier (CHAIR_I resolves more on small sets)",
    )
    cal.add_argument(
        "--min-step",
        type=float,
        default=0.0,
        help="least fall of the measure from one knot to the next (e.g. its standard error, which "
        "the output reports): closer settings are noise apart and make no knot",
    )
    cal.add_argument("--max-tokens", type=int, default=64)
    cal.add_argument("--limit", type=int, default=100, help="images per split (or of the COCO folder)")
    cal.add_argument("--prompt", default=DEFAULT_PROMPT)
    cal.add_argument("--concurrency", type=int, default=8)
    cal.add_argument("--timeout", type=float, default=300.0)
    cal.add_argument("--out", required=True)
    cal.add_argument("--presets", help=f"where to write the presets (default OUT/{PRESETS_FILE})")
    cal.set_defaults(func=cmd_calibrate)
