"""Held-out CHAIR evaluation of a model folder with plain transformers (greedy, unmodified model).

    python -m bench.eval_bundled --model runs/bundled/latest -n 300 --out runs/bundled/eval.json

Captions the in-prior, counter-prior and hard scenes of `training.scenes` through the model's own
processor and chat template (the serving path), then scores them with `bench.chair`. On counter-prior
scenes it also reports `partner_rate`: the share of captions that name the absent usual partner.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.chair import compute_chair, partner_rate
from sevi.families import DEFAULT_PROMPT
from training import scenes

HELD_OUT = ("in-prior", "counter-prior", "hard")


def load(model_dir: str | Path) -> tuple[Any, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


@torch.inference_mode()
def caption_images(
    model: Any, processor: Any, images: list[Any], *, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 64
) -> list[str]:
    """Greedy captions for a batch of PIL images, one chat-template prompt each."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [s.strip() for s in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def evaluate_split(
    model: Any, processor: Any, split: str, n: int, *, batch: int = 50, max_new_tokens: int = 64, progress: bool = True
) -> dict[str, Any]:
    """Caption `n` scenes of `split` and score them; returns the summary plus the captions."""
    captions: dict[str, str] = {}
    truth: dict[str, list[str]] = {}
    absent: dict[str, list[str]] = {}
    t0 = time.time()
    for lo in tqdm(range(0, n, batch), desc=split, disable=not progress):
        batch_scenes = [scenes.make_scene(split, i) for i in range(lo, min(n, lo + batch))]
        caps = caption_images(model, processor, [s.image for s in batch_scenes], max_new_tokens=max_new_tokens)
        for s, c in zip(batch_scenes, caps, strict=True):
            captions[s.image_id], truth[s.image_id], absent[s.image_id] = c, s.objects, s.absent_partners
    result = compute_chair(captions, truth)
    summary: dict[str, Any] = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.summary().items()}
    if split == "counter-prior":
        summary["partner_rate"] = round(partner_rate(captions, absent), 4)
        # Hallucinations that are the absent partner, among all hallucinated mentions.
        halluc = [c for i in result.images for c in i.hallucinated]
        partners = [c for i in result.images for c in i.hallucinated if c in absent[i.image_id]]
        summary["partner_share_of_hallucinations"] = round(len(partners) / len(halluc), 4) if halluc else 0.0
    summary["wall_s"] = round(time.time() - t0, 1)
    return {"summary": summary, "captions": captions}


def evaluate(model_dir: str | Path, n: int, splits: tuple[str, ...] = HELD_OUT, **kw: Any) -> dict[str, Any]:
    model, processor = load(model_dir)
    return {split: evaluate_split(model, processor, split, n, **kw) for split in splits}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (e.g. models/bundled or runs/bundled/latest)")
    p.add_argument("-n", type=int, default=300, help="scenes per split")
    p.add_argument("--splits", default=",".join(HELD_OUT))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", help="write summaries and captions to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = evaluate(args.model, args.n, tuple(args.splits.split(",")), max_new_tokens=args.max_new_tokens)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v["summary"] for k, v in res.items()}, indent=1))


if __name__ == "__main__":
    main()
