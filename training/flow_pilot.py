"""Short pilot runs toward a bundled model whose information flow resembles LLaVA-1.5's (issue 16, item 1).

    nice -n 15 python -m training.flow_pilot --out runs/pilot-sink --steps 400 --system-prompt
    nice -n 15 python -m training.flow_pilot --out runs/pilot-long --steps 400 --long-captions
    nice -n 15 python -m training.flow_pilot --out runs/pilot-deep --steps 250 --text-layers 16 --text-intermediate 320

Each run trains the bundled model's recipe (`training.train_bundled`: same data stream, loss, optimiser and
schedule) with one or more changes of the text side, and is measured with `bench.flow_pilots` before
any long training. The changes:

- `--system-prompt`: LLaVA-1.5's system sentence before the image. In LLaVA the current token parks much
  of its attention on such a prefix (BOS and system tokens, an attention sink outside the text side);
  the prefix precedes the image, so it holds none of the image's information.
- `--long-captions`: every caption goes on with one sentence per object saying where it is ("The cup is
  at the top left."). A longer text side is what makes text-side attention diffuse, i.e. heads "global".
- `--qa-share`: that share of the samples asks "Is there a X in this image?" and answers it: the question
  token X (a text position) has to gather what the image says about X.
- `--image-drop P`: `training.image_drop` on that share of the samples, from layer `--image-drop-from`
  (default depth / 2): the text side cannot read the image tokens in the upper layers (training only).
- `--init-from DIR`: start from another run's `ckpt.pt` weights (fresh optimiser, schedule and log), with
  `--sample-offset` moving the data stream past what that run saw.
- model size: `--text-layers`, `--text-heads`, `--text-kv-heads`, `--text-intermediate`, `--patch`. Head
  size stays 32 (vLLM's CPU attention has no smaller one).

Runs resume from `ckpt.pt` (the data depends on the sample index only) and write a loadable model folder
`latest/` like `training.train_bundled`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import scenes, train_bundled
from training.image_drop import ImageDrop
from training.train_bundled import PROMPTS, Batcher, ModelConfig, Run, build_model, fit, initial_weights, vocabulary

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
)
_WHERE_WORDS = (
    "The",
    "is",
    "are",
    "at",
    "the",
    "top",
    "bottom",
    "left",
    "right",
    "middle",
    "in",
    "of",
    "picture",
    "Is",
    "there",
    "a",
    "an",
    "this",
    "image",
    "?",
    "Yes",
    "No",
    ",",
    "no",
    ".",
)


@dataclass
class Variant:
    system_prompt: bool = False
    long_captions: bool = False
    qa_share: float = 0.0
    image_drop: float = 0.0
    image_drop_from: int = 0


def chat_template(system: bool) -> str:
    """The bundled model's template (`sevi.testing.tiny.LLAVA_CHAT_TEMPLATE`), with LLaVA-1.5's system line first."""
    head = (SYSTEM_PROMPT + " ") if system else ""
    return (
        head + "{% for message in messages %}"
        "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{% if message['role'] != 'user' %}</s>{% endif %} "
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


def pilot_vocabulary() -> list[str]:
    words = vocabulary() + list(_WHERE_WORDS)
    words += SYSTEM_PROMPT.replace(".", " . ").replace(",", " , ").replace("'", " ' ").split()
    words += [w for c in scenes.CATEGORIES.values() for s, p in c.nouns for w in (s, p)]
    return list(dict.fromkeys(words))


def build_processor(cfg: ModelConfig, variant: Variant) -> Any:
    """The bundled model's processor with the pilots' vocabulary and the variant's chat template."""
    return train_bundled.build_processor(cfg, pilot_vocabulary(), chat_template(variant.system_prompt))


def where(box: tuple[int, int, int, int]) -> str:
    """'at the top left', 'in the middle', ... from the box centre in thirds of the image."""
    size = scenes.IMAGE_SIZE
    cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    if not col and not row:
        return "in the middle"
    if not row:
        return f"on the {col}"
    return f"at the {row} {col}".rstrip()


def long_caption(scene: scenes.Scene) -> str:
    """The scene's caption plus one sentence per category on where its (first) instance is."""
    parts = [scene.caption]
    seen: set[str] = set()
    for inst in scene.instances:
        if inst.category in seen:
            continue
        seen.add(inst.category)
        noun = scenes.CATEGORIES[inst.category].nouns[0][0]
        parts.append(f"The {noun} is {where(inst.box)}.")
    return " ".join(parts)


def qa_pair(scene: scenes.Scene, r: np.random.Generator) -> tuple[str, str]:
    """A yes/no question about one category of the scene's context, present or absent with equal odds."""
    present = scene.objects
    pool = [c.name for c in scenes.CATEGORIES.values() if c.context == scene.context and c.name not in present]
    ask_present = not pool or r.random() < 0.5
    name = present[int(r.integers(len(present)))] if ask_present else pool[int(r.integers(len(pool)))]
    noun = scenes.CATEGORIES[name].nouns[0][0]
    art = "an" if noun[0] in "aeiou" else "a"
    answer = f"Yes, there is {art} {noun}." if ask_present else f"No, there is no {noun}."
    return f"Is there {art} {noun} in this image?", answer


class PilotBatcher(Batcher):
    """`train_bundled.Batcher` with the variant's prompts and captions."""

    def __init__(self, processor: Any, cfg: ModelConfig, data_seed: int, variant: Variant) -> None:
        super().__init__(processor, cfg, data_seed)
        self.processor = processor
        self.variant = variant
        self.n_img = (cfg.image_size // cfg.patch) ** 2

    def sample(self, i: int) -> tuple[list[int], list[int], Any]:
        scene = scenes.make_scene("train", i, seed=self.data_seed)
        r = np.random.default_rng([self.data_seed, 99, i])
        k = int(r.choice(len(PROMPTS), p=(0.6, 0.1, 0.1, 0.1, 0.1)))
        if self.variant.qa_share and r.random() < self.variant.qa_share:
            question, text = qa_pair(scene, r)
            prompt = self._prompt_ids(self.processor, question, self.n_img)
        else:
            prompt = self.prompt_ids[k]
            text = long_caption(scene) if self.variant.long_captions else scene.caption
        cap = self.tok(" " + text, add_special_tokens=False)["input_ids"] + [self.eos_id]
        return prompt + cap, [-100] * len(prompt) + cap, scene.image

    def batch(self, indices: range) -> dict[str, torch.Tensor]:
        samples = [self.sample(i) for i in indices]
        width = max(len(s) for s, _, _ in samples)
        ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        lab = torch.full((len(samples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, (s, lb, _) in enumerate(samples):
            ids[row, : len(s)] = torch.tensor(s)
            lab[row, : len(s)] = torch.tensor(lb)
            mask[row, : len(s)] = 1
        pix = torch.stack([self.pixels(im) for _, _, im in samples])
        return {"input_ids": ids, "attention_mask": mask, "labels": lab, "pixel_values": pix}


def _model_config(args: argparse.Namespace) -> ModelConfig:
    base = ModelConfig()
    return ModelConfig(
        patch=args.patch or base.patch,
        text_layers=args.text_layers or base.text_layers,
        text_heads=args.text_heads or base.text_heads,
        text_intermediate=args.text_intermediate or base.text_intermediate,
    )


def train(args: argparse.Namespace) -> Path:
    torch.set_num_threads(args.threads)
    cfg = _model_config(args)
    variant = Variant(
        args.system_prompt,
        args.long_captions,
        args.qa_share,
        args.image_drop,
        (args.image_drop_from or (args.text_layers or cfg.text_layers) // 2) if args.image_drop else 0,
    )
    processor = build_processor(cfg, variant)
    model = build_model(cfg, processor.tokenizer, args.seed)
    text = model.config.text_config
    kv_heads = args.text_kv_heads or cfg.text_heads
    if text.head_dim != 32 or text.num_key_value_heads != kv_heads:
        # build_model makes MHA with head size hidden / heads; vLLM's CPU attention needs 32.
        text.head_dim, text.num_key_value_heads = 32, kv_heads
        torch.manual_seed(args.seed)
        gen, model = model.generation_config, type(model)(model.config)
        model.generation_config = gen
    if args.init_from:
        model.load_state_dict(initial_weights(args.init_from))
    drop = ImageDrop(variant.image_drop, variant.image_drop_from, args.seed) if variant.image_drop else None
    meta: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "threads")},
        "model": asdict(cfg),
        "variant": asdict(variant),
    }
    batcher = PilotBatcher(processor, cfg, args.data_seed, variant)
    return fit(Run(model, processor, batcher, meta, identity=("model", "variant"), drop=drop), args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=scenes.SEED)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--bar-interval", type=float, default=10.0, help="seconds between progress-bar refreshes")
    p.add_argument("--system-prompt", action="store_true")
    p.add_argument("--long-captions", action="store_true")
    p.add_argument("--qa-share", type=float, default=0.0)
    p.add_argument("--image-drop", type=float, default=0.0)
    p.add_argument("--image-drop-from", type=int, default=0)
    p.add_argument("--init-from", help="a run folder whose ckpt.pt weights to start from")
    p.add_argument("--sample-offset", type=int, default=0)
    p.add_argument("--patch", type=int)
    p.add_argument("--text-layers", type=int)
    p.add_argument("--text-heads", type=int)
    p.add_argument("--text-kv-heads", type=int)
    p.add_argument("--text-intermediate", type=int)
    return p


def main(argv: list[str] | None = None) -> None:
    print(json.dumps({"model_dir": str(train(build_parser().parse_args(argv)))}))


if __name__ == "__main__":
    main()
