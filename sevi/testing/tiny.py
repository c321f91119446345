"""Deterministic builder of tiny random vision-language models in Hugging Face format, for tests.

Every model gets a word-level tokenizer trained locally, a chat template and a processor, and is saved
in a layout that both transformers 5.19 and vLLM 0.32 load (llava-hf key names for LLaVA). Head size
is 32 because vLLM's CPU attention supports no smaller one. Nothing is downloaded. The family's facts
(model class, image and end-of-turn tokens, chat template) come from its spec in sevi/families.py;
what is left here is the shape of a tiny model of each kind (`_BUILDERS`).

    python -m sevi.testing.tiny --family llava --out /tmp/tiny-llava
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sevi.families import LLAVA_CHAT_TEMPLATE as LLAVA_CHAT_TEMPLATE  # the bundled model's trainer imports it here
from sevi.families import SPECS, FamilySpec, spec_for

FAMILIES = tuple(SPECS)

BASE_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "this",
    "image",
    "shows",
    "there",
    "is",
    "are",
    "of",
    "in",
    "on",
    "with",
    "and",
    "near",
    "next",
    "to",
    "two",
    "three",
    "some",
    "person",
    "man",
    "woman",
    "dog",
    "cat",
    "car",
    "bus",
    "truck",
    "bicycle",
    "cup",
    "bowl",
    "fork",
    "knife",
    "spoon",
    "table",
    "chair",
    "couch",
    "bed",
    "tv",
    "laptop",
    "bird",
    "horse",
    "kite",
    "ball",
    "tree",
    "grass",
    "road",
    "sky",
    "room",
    "kitchen",
    "street",
    "park",
    "red",
    "blue",
    "green",
    "small",
    "large",
    ".",
    ",",
    ":",
    "USER",
    "ASSISTANT",
    "user",
    "assistant",
    "please",
    "describe",
    "detail",
    "what",
    "do",
    "you",
    "see",
)

LLAVA_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
QWEN_SPECIALS = [
    "<pad>",
    "<unk>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|image_pad|>",
    "<|vision_end|>",
    "<|video_pad|>",
]


def make_word_tokenizer(
    words: list[str] | tuple[str, ...],
    specials: list[str],
    *,
    bos: str | None,
    eos: str,
    pad: str = "<pad>",
    unk: str = "<unk>",
    extra: dict[str, Any] | None = None,
) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer whose specials take the first ids."""
    vocab: dict[str, int] = {}
    for token in [*specials, *words]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    kwargs: dict[str, Any] = {"unk_token": unk, "pad_token": pad, "eos_token": eos}
    if bos is not None:
        kwargs["bos_token"] = bos
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **kwargs, **(extra or {}))
    tok.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (pad, unk, eos, bos)]})
    tok.padding_side = "left"
    return tok


def llava_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename transformers-5 LLaVA keys to the llava-hf layout that vLLM 0.32 and transformers both load."""
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("model.language_model."):
            new = "language_model.model." + key[len("model.language_model.") :]
        elif key.startswith("lm_head."):
            new = "language_model." + key
        elif key.startswith("model.vision_tower."):
            rest = key[len("model.vision_tower.") :]
            new = "vision_tower." + (rest if rest.startswith("vision_model.") else "vision_model." + rest)
        elif key.startswith("model."):
            new = key[len("model.") :]
        else:
            new = key
        renamed[new] = tensor.detach().contiguous().clone()
    return renamed


def save_model_dir(model: Any, processor: Any, out: str | Path) -> Path:
    """Save config, weights, tokenizer, processor and chat template; LLaVA weights in llava-hf layout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # vLLM picks its model class from `architectures`; a model built from a config has none yet.
    spec = spec_for(model.config.model_type)
    model.config.architectures = [spec.architecture]
    if spec.llava_hf_keys:
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        save_file(llava_hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    template = getattr(processor, "chat_template", None)
    if template and not (out / "chat_template.jinja").exists():
        (out / "chat_template.jinja").write_text(template)
    return out


def _llava_configs(
    spec: FamilySpec,
    vocab_size: int,
    image_token_id: int,
    pad_id: int,
    eos_id: int,
    bos_id: int,
    layers: int,
    heads: int,
    kv_heads: int,
    image_size: int,
    patch: int,
    head_dim: int = 32,
    intermediate_size: int | None = None,
    max_positions: int = 1024,
) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig

    hidden = heads * head_dim
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate_size or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=64,
    )
    common: dict[str, Any] = dict(
        text_config=text,
        vision_config=vision,
        image_token_index=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    if spec.model_type == "llava_next":
        common["image_grid_pinpoints"] = [[image_size, image_size * 2], [image_size * 2, image_size]]
    return transformers.AutoConfig.for_model(spec.model_type, **common)


def build_llava(
    family: str = "llava",
    *,
    seed: int = 0,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    image_size: int = 32,
    patch: int = 8,
    head_dim: int = 32,
    intermediate_size: int | None = None,
    max_positions: int = 1024,
) -> tuple[torch.nn.Module, Any]:
    """A tiny random LLaVA-1.5 (`llava`) or LLaVA-NeXT (`llava_next`) with its processor; `head_dim=128,
    heads=32, intermediate_size=11008` gives LLaVA-1.5-7B's decoder width (bench/gpu_engine_tier.py)."""
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    spec = spec_for(family)
    tok = make_word_tokenizer(BASE_WORDS, LLAVA_SPECIALS, bos="<s>", eos=spec.eos_token)
    ids: dict[str, Any] = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIALS}
    cfg = _llava_configs(
        spec,
        len(tok),
        ids[spec.image_token],
        ids["<pad>"],
        ids[spec.eos_token],
        ids["<s>"],
        layers,
        heads,
        kv_heads or heads,
        image_size,
        patch,
        head_dim,
        intermediate_size,
        max_positions,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, spec.architecture)(cfg).eval()
    _spread_init(model, seed)
    # PIL image processors: torchvision is not installed (its PyPI wheels are CUDA builds).
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    improc: Any
    if family == "llava":
        improc = CLIPImageProcessorPil(size=size, crop_size=crop, do_center_crop=True)
    else:
        improc = LlavaNextImageProcessorPil(
            size=size, crop_size=crop, do_center_crop=True, image_grid_pinpoints=cfg.image_grid_pinpoints
        )
    proc_cls = LlavaProcessor if family == "llava" else LlavaNextProcessor
    processor = proc_cls(
        image_processor=improc,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=spec.chat_template,
        num_additional_image_tokens=1,
    )
    return model, processor


def build_qwen(
    family: str = "qwen2_vl",
    *,
    seed: int = 0,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
) -> tuple[torch.nn.Module, Any]:
    """A tiny random Qwen2-VL (or Qwen2.5-VL) with GQA and M-RoPE, and its processor."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    spec = spec_for(family)
    tok = make_word_tokenizer(BASE_WORDS, QWEN_SPECIALS, bos=None, eos=spec.eos_token)
    ids: dict[str, Any] = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text: dict[str, Any] = dict(
        vocab_size=len(tok),
        hidden_size=heads * 32,
        intermediate_size=heads * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        pad_token_id=ids["<pad>"],
        eos_token_id=ids[spec.eos_token],
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    vision: dict[str, Any] = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    common: dict[str, Any] = dict(
        image_token_id=ids[spec.image_token],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=None,
        eos_token_id=ids[spec.eos_token],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    if spec.model_type == "qwen2_vl":  # the two vision towers take different sizes
        vision.update(embed_dim=64, hidden_size=heads * 32, mlp_ratio=2)
    else:
        vision.update(
            hidden_size=64, intermediate_size=128, out_hidden_size=heads * 32, window_size=56, fullatt_block_indexes=[1]
        )
    cfg = transformers.AutoConfig.for_model(spec.model_type, text_config=text, vision_config=vision, **common)
    torch.manual_seed(seed)
    model = getattr(transformers, spec.architecture)(cfg).eval()
    _spread_init(model, seed)
    improc = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    video = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = Qwen2VLProcessor(
        image_processor=improc, tokenizer=tok, video_processor=video, chat_template=spec.chat_template
    )
    return model, processor


def _spread_init(model: torch.nn.Module, seed: int) -> None:
    """Re-draw weights with a larger spread so random attention is peaked and varied across heads.

    With the default 0.02 init every head is near-uniform and one token's attention is all alike,
    which hides bugs: tests want heads that differ (core, global and other heads all present).
    """
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("q_proj" in name or "k_proj" in name):
                # Scores grow with the fan-in: past 1024 (LLaVA-7B's 4096 in bench/gpu_engine_tier.py) the spread
                # shrinks to keep them as peaked as at 256, not saturated; narrower models keep their weights.
                width = 1.0 if p.shape[1] <= 1024 else (256 / p.shape[1]) ** 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * 0.25 * width)
            elif p.dim() >= 2 and ("v_proj" in name or "o_proj" in name) and "language_model" in name:
                # Attention must matter to the logits, or changing it changes nothing measurable.
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
            elif p.dim() >= 2 and ("embed_tokens" in name or "lm_head" in name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


# The tiny model of each family: one builder per kind of architecture (a new family names one here).
_BUILDERS: dict[str, Callable[..., tuple[torch.nn.Module, Any]]] = {
    "llava": build_llava,
    "llava_next": build_llava,
    "qwen2_vl": build_qwen,
    "qwen2_5_vl": build_qwen,
}


def build(family: str, out: str | Path | None = None, **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """Build a tiny model of `family` (a model type of sevi.families.SPECS); save it to `out` when given."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    model, processor = _BUILDERS[family](family, **kwargs)
    if out is not None:
        save_model_dir(model, processor, out)
    return model, processor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, default="llava")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args(argv)
    build(args.family, args.out, seed=args.seed, layers=args.layers, heads=args.heads)
    print(json.dumps({"family": args.family, "out": args.out}))


if __name__ == "__main__":
    main()
