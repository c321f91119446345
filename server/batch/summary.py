"""The end-of-job summary: this run's rates, and per level over the whole output (earlier runs included)."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.batch.output import records
from server.batch.records import caption_of, failed, result_of

TELEMETRY = ("aligned_rows", "stage1_rows", "stage2_rows", "heads_reweighted", "contrast_steps", "contrast_dissolved")


@dataclass
class _Level:
    results: int = 0
    failures: int = 0
    words: int = 0
    tokens: int = 0
    telemetry: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TELEMETRY, 0))


def summarize(output: Path, run: dict[str, Any]) -> dict[str, Any]:
    """`run`: this run's counts and seconds. Per level: results, failures, mean caption length in words and tokens,
    mean telemetry per successful result. One streaming pass over the output."""
    levels: dict[str, _Level] = defaultdict(_Level)
    ids: set[str] = set()
    for rec in records(output):
        name = json.dumps(rec.get("conservativeness"))
        lv = levels[name]
        ids.add(str(rec.get("custom_id", rec.get("id"))))
        if failed(rec):
            lv.failures += 1
            continue
        lv.results += 1
        lv.words += len((caption_of(rec) or "").split())
        res = result_of(rec)
        lv.tokens += int(res.get("usage", {}).get("completion_tokens", 0))
        for k in TELEMETRY:
            lv.telemetry[k] += int(res.get("telemetry", {}).get(k, 0))
    seconds = max(run.get("seconds", 0.0), 1e-9)
    per_level = {}
    for name, lv in sorted(levels.items()):
        n = max(lv.results, 1)
        per_level[name if name != "null" else "as requested"] = {
            "results": lv.results,
            "failures": lv.failures,
            "mean_caption_words": round(lv.words / n, 2),
            "mean_completion_tokens": round(lv.tokens / n, 2),
            "mean_telemetry": {k: round(v / n, 2) for k, v in lv.telemetry.items()},
        }
    return {
        "output": str(output),
        "items": len(ids),
        "results": sum(lv.results + lv.failures for lv in levels.values()),
        "failures": sum(lv.failures for lv in levels.values()),
        "this_run": {
            **run,
            "results_per_s": round(run.get("results", 0) / seconds, 3),
            "images_per_s": round(run.get("images", 0) / seconds, 3),
            "tokens_per_s": round(run.get("tokens", 0) / seconds, 1),
        },
        "levels": per_level,
    }


def render(summary: dict[str, Any]) -> str:
    """The summary as a few readable lines (the JSON goes to stdout)."""
    r = summary["this_run"]
    lines = [
        f"{summary['items']} items, {summary['results']} results, {summary['failures']} failed"
        f"  ->  {summary['output']}",
        f"this run: {r.get('results', 0)} results ({r.get('skipped', 0)} already done) in {r.get('seconds', 0):.1f} s: "
        f"{r['images_per_s']:.2f} images/s, {r['results_per_s']:.2f} results/s, {r['tokens_per_s']:.1f} tokens/s",
    ]
    if r.get("unwritten"):
        lines.append(f"{r['unwritten']} results not written after engine errors: rerun the command to retry them")
    for name, lv in summary["levels"].items():
        t = lv["mean_telemetry"]
        lines.append(
            f"  c={name:<8} {lv['results']:>6} ok {lv['failures']:>4} failed  mean {lv['mean_caption_words']:.1f} words"
            f" / {lv['mean_completion_tokens']:.1f} tokens  heads re-weighted {t['heads_reweighted']:.1f}"
            f"  contrast steps {t['contrast_steps']:.1f}"
        )
    return "\n".join(lines)
