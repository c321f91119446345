"""`python -m bench.chair run`: caption a split through a live server at several conservativeness levels.

    python -m bench.chair run --server http://127.0.0.1:8000 --split counter-prior \\
        --levels 0,0.25,0.5,0.75,1 [--contrast on|off] [--max-tokens 64] [--limit 100] --out runs/chair

Any engine works: it only speaks HTTP (`POST /caption`, greedy). Captions are appended to
`DIR/captions/<split>-<contrast>-c<level>.jsonl` as they arrive, so an interrupted run resumes where it
stopped. At the end it writes `DIR/<split>-<contrast>.json` (per level: chair_s, chair_i, recall, len,
partner_rate on counter-prior scenes, and the alignment telemetry: the share of aligned rows where
stage 1 and stage 2 fired), the same as a markdown table (`.md`), and a trade-off plot (`.png`).
"""

from __future__ import annotations

import argparse
import io
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from tqdm import tqdm

from bench.chair.score import compute_chair, load_coco_truth, partner_rate
from sevi.families import DEFAULT_PROMPT


@dataclass
class Item:
    image_id: str
    load: Any  # () -> PIL image; scenes are drawn on demand, COCO files read on demand
    truth: list[str]
    absent_partners: list[str]


def scene_items(split: str, limit: int) -> list[Item]:
    from training import scenes

    def drawer(i: int) -> Any:
        return lambda: scenes.make_scene(split, i).image

    items = []
    for i in range(limit):
        s = scenes.make_scene(split, i)
        items.append(Item(s.image_id, drawer(i), list(s.objects), list(s.absent_partners)))
    return items


def coco_items(folder: Path, limit: int) -> list[Item]:
    truth = load_coco_truth(folder)
    images = folder / "val2014"
    items = []
    for image_id in sorted(truth)[:limit]:
        path = next(images.glob(f"*{int(image_id):012d}.jpg"), None)
        if path is not None:
            items.append(Item(image_id, lambda p=path: Image.open(p).convert("RGB"), truth[image_id], []))
    return items


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def caption_one(
    client: httpx.Client,
    item: Item,
    level: float,
    contrast: bool,
    max_tokens: int,
    prompt: str,
    kappa: float | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One greedy caption; `extra`: more form fields (explicit omega / start_layer, as `calibrate` sends)."""
    data = {"conservativeness": str(level), "max_tokens": str(max_tokens), "temperature": "0", "prompt": prompt}
    if level > 0:  # level 0 is the unmodified model, the baseline of both curves
        data["contrast"] = "true" if contrast else "false"
        if kappa is not None:
            data["kappa"] = str(kappa)
        data.update(extra or {})
    for attempt in range(5):
        resp = client.post("/caption", data=data, files={"image": ("image.png", _png(item.load()), "image/png")})
        if resp.status_code == 503 and attempt < 4:  # queue full: back off as the server asks
            threading.Event().wait(float(resp.headers.get("retry-after", "1")))
            continue
        resp.raise_for_status()
        body = resp.json()
        return {
            "image_id": item.image_id,
            "caption": body["caption"],
            "telemetry": body.get("telemetry", {}),
            "alignment": body.get("alignment", {}),
        }
    raise RuntimeError("server kept answering 503")


def _done(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["image_id"]: r for r in rows}


def run_level(
    client: httpx.Client,
    items: list[Item],
    level: float,
    contrast: bool,
    path: Path,
    max_tokens: int,
    prompt: str,
    concurrency: int,
    label: str,
    kappa: float | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    done = _done(path)
    todo = [it for it in items if it.image_id not in done]
    lock = threading.Lock()
    with (
        path.open("a") as sink,
        ThreadPoolExecutor(concurrency) as pool,
        tqdm(total=len(items), initial=len(items) - len(todo), desc=label) as bar,
    ):

        def work(item: Item) -> None:
            row = caption_one(client, item, level, contrast, max_tokens, prompt, kappa, extra)
            with lock:
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                done[item.image_id] = row
                bar.update(1)

        for future in [pool.submit(work, it) for it in todo]:
            future.result()
    return done


def summarize(items: list[Item], rows: dict[str, dict[str, Any]], partners: bool) -> dict[str, Any]:
    captions = {it.image_id: rows[it.image_id]["caption"] for it in items}
    result = compute_chair(captions, {it.image_id: it.truth for it in items})
    out: dict[str, Any] = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.summary().items()}
    if partners:
        out["partner_rate"] = round(partner_rate(captions, {it.image_id: it.absent_partners for it in items}), 4)
    tele = [rows[it.image_id].get("telemetry") or {} for it in items]
    aligned = sum(t.get("aligned_rows", 0) for t in tele)
    out["stage1_share"] = round(sum(t.get("stage1_rows", 0) for t in tele) / aligned, 4) if aligned else 0.0
    out["stage2_share"] = round(sum(t.get("stage2_rows", 0) for t in tele) / aligned, 4) if aligned else 0.0
    out["aligned_rows_per_caption"] = round(aligned / len(items), 1) if items else 0.0
    return out


def markdown(name: str, table: dict[str, dict[str, Any]]) -> str:
    cols = ["chair_s", "chair_i", "recall", "len", "partner_rate", "stage1_share", "stage2_share"]
    present = [c for c in cols if any(c in row for row in table.values())]
    lines = [f"### {name}", "", "| conservativeness | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for level, row in table.items():
        lines.append(f"| {level} | " + " | ".join(str(row.get(c, "")) for c in present) + " |")
    return "\n".join(lines) + "\n"


def plot(name: str, table: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [float(k) for k in table]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, style in (("chair_s", "o-"), ("chair_i", "s-"), ("recall", "^-"), ("partner_rate", "d--")):
        if all(key in row for row in table.values()):
            ax.plot(levels, [row[key] for row in table.values()], style, label=key)
    ax.set_xlabel("conservativeness")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _levels(text: str) -> Iterator[float]:
    for part in text.split(","):
        value = float(part)
        if not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(f"level {value} outside [0, 1]")
        yield value


def cmd_run(args: argparse.Namespace) -> int:
    contrast = args.contrast == "on"
    if args.coco:
        items, name, partners = coco_items(Path(args.coco), args.limit), "coco", False
    else:
        items, name, partners = scene_items(args.split, args.limit), args.split, args.split == "counter-prior"
    tag = f"{name}-contrast-{args.contrast}" + (f"-kappa{args.kappa:g}" if args.kappa is not None else "")
    out = Path(args.out)
    (out / "captions").mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    table: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=args.server, timeout=args.timeout, headers=headers) as client:
        for level in list(_levels(args.levels)):
            rows = run_level(
                client,
                items,
                level,
                contrast,
                out / "captions" / f"{tag}-c{level:g}.jsonl",
                args.max_tokens,
                args.prompt,
                args.concurrency,
                f"{tag} c={level:g}",
                args.kappa,
            )
            table[f"{level:g}"] = summarize(items, rows, partners)
    (out / f"{tag}.json").write_text(
        json.dumps(
            {
                "split": name,
                "contrast": contrast,
                "kappa": args.kappa,
                "n": len(items),
                "max_tokens": args.max_tokens,
                "levels": table,
            },
            indent=1,
        )
    )
    title = f"{name}, contrast {args.contrast}" + (f", kappa {args.kappa:g}" if args.kappa is not None else "")
    (out / f"{tag}.md").write_text(markdown(f"{title}, n={len(items)}", table))
    plot(f"{title} (n={len(items)})", table, out / f"{tag}.png")
    print((out / f"{tag}.md").read_text())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Overlay several `run` results: CHAIR_S and recall against conservativeness, one curve per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for path in args.results:
        result = json.loads(Path(path).read_text())
        label = f"contrast {'on' if result['contrast'] else 'off'}" + (
            f", kappa {result['kappa']:g}" if result.get("kappa") is not None else ""
        )
        levels = [float(k) for k in result["levels"]]
        left.plot(levels, [r["chair_s"] for r in result["levels"].values()], "o-", label=label)
        right.plot(levels, [r["recall"] for r in result["levels"].values()], "o-", label=label)
    for ax, name in ((left, "CHAIR_S (lower is better)"), (right, "recall")):
        ax.set_xlabel("conservativeness")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(args.out)
    return 0


def add_run_command(sub: Any) -> None:
    compare = sub.add_parser("compare", help="plot several `run` results (JSON files) on one trade-off chart")
    compare.add_argument("results", nargs="+")
    compare.add_argument("--title", default="")
    compare.add_argument("--out", required=True)
    compare.set_defaults(func=cmd_compare)

    run = sub.add_parser("run", help="caption a split through a live server at several levels and score it")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", choices=("in-prior", "counter-prior", "hard"), help="synthetic scene split")
    source.add_argument("--coco", help="local COCO folder (val2014/ and annotations/)")
    run.add_argument("--server", default="http://127.0.0.1:8000")
    run.add_argument("--api-key")
    run.add_argument("--levels", default="0,0.25,0.5,0.75,1")
    run.add_argument("--contrast", choices=("on", "off"), default="on")
    run.add_argument("--max-tokens", type=int, default=64)
    run.add_argument(
        "--kappa", type=float, help="override the core-head threshold at levels > 0 (default: the mapping's 0.2)"
    )
    run.add_argument("--limit", type=int, default=100, help="images per level")
    run.add_argument("--prompt", default=DEFAULT_PROMPT)
    run.add_argument("--concurrency", type=int, default=8, help="requests in flight (the server batches them)")
    run.add_argument("--timeout", type=float, default=300.0)
    run.add_argument("--out", required=True)
    run.set_defaults(func=cmd_run)
