"""Train the bundled captioning model (a small LLaVA) on the synthetic scenes of `training.scenes`.

    python -m training.train_bundled --out runs/bundled --steps 2400 --threads 2
    python -m training.train_bundled --out runs/bundled --steps 2400 --threads 2   # resumes from runs/bundled
    python -m training.train_bundled --out runs/bundled --export models/bundled   # ship the run's weights
    python -m training.train_bundled --out runs/bundled-v2 --init-from models/bundled --sample-offset 96000 \
        --image-drop 0.9 --steps 400 --lr 1e-3 --warmup 20    # a second stage with image drop

Architecture (issue 5): LlavaForConditionalGeneration with a CLIP vision tower (96 px, patch 16: 36
image tokens; the last vision layer feeds the projector because the tower is shallow) and a Llama
decoder of 8 layers x 8 heads of dim 32 (hidden 256). Word-level tokenizer, chat template and
processor come from `sevi.testing.tiny`, so the model folder loads in transformers and in vLLM alike.

Training data is the seeded, unbounded `train` stream: sample i of the run is scene i, so a run is
reproducible and resumes exactly from a step number. The prompt is the serving prompt (chat template,
image, one of a few "describe this image" phrasings); the loss covers the caption tokens and the
end-of-sequence token only. `--image-drop P` hides the image tokens from the text side in the upper
layers for that share of the samples (`training.image_drop`); `--init-from` starts from a model folder's
or a run's weights (a second stage), `--sample-offset` moves the data stream past what they saw. Every
`--save-every` steps the script writes `ckpt.pt` (model, optimizer,
step) and a loadable model folder `latest/`; `loss.jsonl` logs the loss curve.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sevi.testing.tiny import LLAVA_CHAT_TEMPLATE, LLAVA_SPECIALS, make_word_tokenizer, save_model_dir
from training import scenes
from training.image_drop import ImageDrop

# Serving prompts: the first is the CHAIR protocol's; the others keep the model from keying on one text.
PROMPTS = (
    "Please describe this image in detail.",
    "Describe this image.",
    "What do you see in this image?",
    "Describe the objects in this picture.",
    "Please describe this image.",
)
PROMPT_WEIGHTS = (0.6, 0.1, 0.1, 0.1, 0.1)
# CLIP normalisation constants (the processor's defaults), applied here without the processor for speed.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_EXTRA_WORDS = ("USER", "ASSISTANT", ":", "?", "the", "what", "is", "in", "image", "picture", "photo", "objects")


@dataclass
class ModelConfig:
    image_size: int = scenes.IMAGE_SIZE
    patch: int = 16
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 256
    text_layers: int = 8
    text_heads: int = 8
    text_intermediate: int = 512


MICRO = ModelConfig(
    vision_hidden=32, vision_layers=1, vision_heads=1, text_hidden=64, text_layers=2, text_heads=2, text_intermediate=64
)


def vocabulary() -> list[str]:
    words = [*_EXTRA_WORDS]
    for prompt in PROMPTS:
        words += prompt.replace(".", " .").replace("?", " ?").split()
    words += scenes.caption_vocabulary()
    return list(dict.fromkeys(words))


def build_processor(
    cfg: ModelConfig, words: Sequence[str] | None = None, chat_template: str = LLAVA_CHAT_TEMPLATE
) -> Any:
    """LlavaProcessor: word tokenizer (`words`, default this model's vocabulary), chat template, PIL CLIP
    image processor sized to the scenes."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = make_word_tokenizer(list(words or vocabulary()), LLAVA_SPECIALS, bos="<s>", eos="</s>")
    improc = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        do_center_crop=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=improc,
        tokenizer=tok,
        patch_size=cfg.patch,
        vision_feature_select_strategy="default",
        chat_template=chat_template,
        num_additional_image_tokens=1,
    )


def build_model(cfg: ModelConfig, tok: Any, seed: int) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIALS}
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        head_dim=cfg.text_hidden // cfg.text_heads,
        max_position_embeddings=512,
        pad_token_id=ids["<pad>"],
        eos_token_id=ids["</s>"],
        bos_token_id=ids["<s>"],
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=4 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch,
        projection_dim=cfg.vision_hidden,
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=ids["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(cfg.image_size // cfg.patch) ** 2,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]  # vLLM picks its model class from this
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = ids["<pad>"], ids["</s>"], ids["<s>"]
    gen.do_sample, gen.max_new_tokens = False, 64
    return model


class Batcher:
    """Turns stream indices into padded training batches; deterministic in the index alone."""

    def __init__(self, processor: Any, cfg: ModelConfig, data_seed: int) -> None:
        self.tok = processor.tokenizer
        self.data_seed = data_seed
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self.pad_id = self.tok.pad_token_id
        self.eos_id = self.tok.eos_token_id
        n_img = (cfg.image_size // cfg.patch) ** 2
        self.prompt_ids = [self._prompt_ids(processor, p, n_img) for p in PROMPTS]
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def _prompt_ids(self, processor: Any, prompt: str, n_img: int) -> list[int]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids: list[int] = []
        for t in self.tok(text, add_special_tokens=False)["input_ids"]:
            ids += [t] * n_img if t == self.image_id else [t]  # what the processor's expansion does
        return ids

    def pixels(self, image: Any) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std

    def batch(self, indices: range) -> dict[str, torch.Tensor]:
        seqs: list[list[int]] = []
        labels: list[list[int]] = []
        pix: list[torch.Tensor] = []
        for i in indices:
            scene = scenes.make_scene("train", i, seed=self.data_seed)
            k = int(np.random.default_rng([self.data_seed, 99, i]).choice(len(PROMPTS), p=PROMPT_WEIGHTS))
            prompt = self.prompt_ids[k]
            cap = self.tok(" " + scene.caption, add_special_tokens=False)["input_ids"] + [self.eos_id]
            seqs.append(prompt + cap)
            labels.append([-100] * len(prompt) + cap)
            pix.append(self.pixels(scene.image))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, (s, lb) in enumerate(zip(seqs, labels, strict=True)):
            ids[r, : len(s)] = torch.tensor(s)
            lab[r, : len(s)] = torch.tensor(lb)
            mask[r, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": lab, "pixel_values": torch.stack(pix)}


def lr_at(step: int, peak: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor * peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def _save_ckpt(path: Path, model: Any, opt: torch.optim.Optimizer, step: int, meta: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "meta": meta}, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a truncated checkpoint


def _trim_log(log: Path, step: int) -> None:
    """Drop log rows past the resumed step, so a resumed run's curve has no duplicates."""
    if log.exists():
        rows = [ln for ln in log.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        log.write_text("".join(r + "\n" for r in rows))


@dataclass
class Run:
    """One training run: what `fit` trains and how its checkpoint is recognised on resume."""

    model: Any
    processor: Any
    batcher: Batcher
    meta: dict[str, Any]  # args, model config, ...: written to run.json and every checkpoint
    identity: tuple[str, ...] = ("model",)  # meta keys a checkpoint must match to be resumed
    drop: ImageDrop | None = None


def fit(run: Run, args: argparse.Namespace) -> Path:
    """The training loop of the bundled model and the pilots: AdamW, warm-up + cosine, gradient clip 1,
    `loss.jsonl`, `ckpt.pt` and a loadable `latest/` every `--save-every` steps; resumes from `ckpt.pt`."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, drop, meta = run.model, run.drop, {**run.meta, "elapsed_s": 0.0}
    image_id = run.batcher.image_id
    if drop is not None:
        drop.attach(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    ckpt = out / "ckpt.pt"
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        for key in run.identity:
            if state["meta"].get(key) != meta[key]:
                raise SystemExit(f"{ckpt} was written for another run (its {key} differs); use a new --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        meta["elapsed_s"] = float(state["meta"].get("elapsed_s", 0.0))
    log = out / "loss.jsonl"
    _trim_log(log, step)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "run.json").write_text(json.dumps({**meta, "params": n_params}, indent=1))

    bar = tqdm(total=args.steps, initial=step, desc="train", mininterval=args.bar_interval, dynamic_ncols=True)
    start = time.time() - meta["elapsed_s"]
    window: list[float] = []
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        first = args.sample_offset + step * args.batch
        batch = run.batcher.batch(range(first, first + args.batch))
        if drop is not None:
            drop.choose(batch["input_ids"], image_id, step)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        window.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{window[-1]:.3f}", lr=f"{lr:.2e}", refresh=False)
        if step % args.log_every == 0 or step == args.steps:
            row = {
                "step": step,
                "loss": round(sum(window) / len(window), 5),
                "lr": lr,
                "samples": step * args.batch,
                "elapsed_s": round(time.time() - start, 1),
            }
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            window = []
        if step % args.save_every == 0 or step == args.steps:
            meta["elapsed_s"] = time.time() - start
            _save_ckpt(ckpt, model, opt, step, meta)
            model.eval()
            if drop is not None:
                drop.detach(model)  # the folder is a stock LLaVA: the training-only mask is not part of it
            save_model_dir(model, run.processor, out / "latest")
            (out / "latest" / "train_state.json").write_text(json.dumps({"step": step, **meta}, indent=1))
            if drop is not None:
                drop.attach(model)
            model.train()
    bar.close()
    return out / "latest"


def train(args: argparse.Namespace) -> Path:
    torch.set_num_threads(args.threads)
    cfg = MICRO if args.micro else ModelConfig()
    processor = build_processor(cfg)
    model = build_model(cfg, processor.tokenizer, args.seed)
    if args.init_from:
        model.load_state_dict(initial_weights(args.init_from))
    drop = None
    if args.image_drop:
        drop = ImageDrop(args.image_drop, args.image_drop_from or cfg.text_layers // 2, args.seed)
    hparams = {k: v for k, v in vars(args).items() if k not in ("func", "out", "threads")}
    meta: dict[str, Any] = {"args": hparams, "model": asdict(cfg)}
    return fit(Run(model, processor, Batcher(processor, cfg, args.data_seed), meta, drop=drop), args)


def initial_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """Weights to start from: a run folder's `ckpt.pt`, or a model folder (e.g. `models/bundled`)."""
    source = Path(source)
    if (source / "ckpt.pt").exists():
        return torch.load(source / "ckpt.pt", map_location="cpu", weights_only=False)["model"]  # type: ignore[no-any-return]
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32).state_dict()  # type: ignore[no-any-return]


def export(run: str | Path, dst: str | Path) -> Path:
    """Write the model folder of run `run` (from its `ckpt.pt`) to `dst`, with the loss curve as PNG/CSV."""
    run, dst = Path(run), Path(dst)
    state = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=False)
    cfg = ModelConfig(**state["meta"]["model"])
    processor = build_processor(cfg)
    model = build_model(cfg, processor.tokenizer, 0)
    model.load_state_dict(state["model"])
    save_model_dir(model.eval(), processor, dst)
    rows = [json.loads(x) for x in (run / "loss.jsonl").read_text().splitlines() if x.strip()]
    (dst / "loss_curve.csv").write_text(
        "step,loss,lr,samples,elapsed_s\n"
        + "".join(f"{r['step']},{r['loss']},{r['lr']:.6g},{r['samples']},{r['elapsed_s']}\n" for r in rows)
    )
    plot_loss_curve(run / "loss.jsonl", dst / "loss_curve.png")
    return dst


def plot_loss_curve(log: str | Path, png: str | Path, size: tuple[int, int] = (480, 240)) -> None:
    """A plain PIL line plot of `loss.jsonl` (log-scale loss against step); matplotlib is not a dependency."""
    from PIL import Image, ImageDraw

    rows = [json.loads(x) for x in Path(log).read_text().splitlines() if x.strip()]
    steps = [r["step"] for r in rows]
    losses = [math.log10(r["loss"]) for r in rows]
    w, h, pad = size[0], size[1], 36
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    lo, hi = math.floor(min(losses) * 2) / 2, math.ceil(max(losses) * 2) / 2

    def xy(step: float, lg: float) -> tuple[float, float]:
        return (pad + (w - 2 * pad) * step / max(steps), h - pad - (h - 2 * pad) * (lg - lo) / (hi - lo))

    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    tick = lo
    while tick <= hi + 1e-9:
        y = xy(0, tick)[1]
        d.line([pad - 4, y, pad, y], fill="black")
        d.text((2, y - 6), f"{10**tick:.2g}", fill="black")
        tick += 0.5
    d.line([xy(s, v) for s, v in zip(steps, losses, strict=True)], fill=(30, 80, 200), width=2)
    d.text((pad, h - pad + 6), f"step 0 .. {max(steps)}   (loss per caption token, log scale)", fill="black")
    img.save(png)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder: ckpt.pt, loss.jsonl, latest/ (resumes if present)")
    p.add_argument("--export", metavar="DIR", help="only write the run's model folder (and loss curve) to DIR")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    p.add_argument("--data-seed", type=int, default=scenes.SEED, help="seed of the training scene stream")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--bar-interval", type=float, default=10.0, help="seconds between progress-bar refreshes")
    p.add_argument("--micro", action="store_true", help="a micro model, for tests")
    p.add_argument("--init-from", metavar="DIR", help="start from these weights: a model folder or a run folder")
    p.add_argument("--sample-offset", type=int, default=0, help="first training scene (past what --init-from saw)")
    p.add_argument("--image-drop", type=float, default=0.0, help="share of samples trained with image drop")
    p.add_argument("--image-drop-from", type=int, default=0, help="first layer of the drop (default: depth / 2)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.export:
        print(json.dumps({"model_dir": str(export(args.out, args.export))}))
        return
    print(json.dumps({"model_dir": str(train(args))}))


if __name__ == "__main__":
    main()
