"""Model families: one spec per Hugging Face `model_type`, and the adapters where behaviour differs.

Every per-family fact lives here, in :data:`SPECS`, and every user reads it from here: the reference
engine (sevi/engines/reference/generation.py), the vLLM engine (sevi/engines/vllm/vllm_engine.py: the architecture name,
EOS, the prompt), the vLLM plugin (sevi/engines/vllm/plugin/logits_processor.py: image token, "other" rule,
EOS) and the tiny-model builder (sevi/testing/tiny.py). Adding a family means one :class:`FamilySpec` in
:data:`SPECS`, an adapter subclass of :class:`Family` only where the model's inputs behave differently
(LLaVA-NeXT's crops, Qwen's M-RoPE positions), and a builder in sevi/testing/tiny.py for its tests.

The rules (spec section 4):
- `e` is the last position whose id is the image token (after the processor expanded the placeholders),
  in every family here; the token's id comes from the config (`image_token_id` / `image_token_index`).
- "other" keys: every key up to `e` (LLaVA-1.5 / LLaVA-NeXT), or only the image-token span (Qwen2-VL /
  Qwen2.5-VL: `other_is_image_only`).
- Qwen positions are 3-D (M-RoPE) with a per-sequence offset for the tokens after the image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

# The captioning instruction of requests that name none: the CHAIR protocol's (spec section 6), so that
# the server's default, the CLIs and the benchmarks all caption with the same words.
DEFAULT_PROMPT = "Please describe this image in detail."

# The families' prompt formats as Jinja chat templates over content parts {"type": "image"|"text"}.
# Real checkpoints bring their own template (the engines render with it: render_prompt); these are the
# formats the tiny test models and the bundled model are given, written as the real ones render.
LLAVA_CHAT_TEMPLATE = (  # LLaVA-1.5: "USER: <image>\n... ASSISTANT:"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_CHAT_TEMPLATE = (  # Qwen2-VL's ChatML, the image as <|vision_start|><|image_pad|><|vision_end|>
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ImageLayout:
    """Where the image tokens of one prompt are: `last_image` (e, -1 if none) and a bool mask per token."""

    last_image: int
    image_mask: torch.Tensor


# ---- reading a config (an HF config object, or the dict of its config.json) --------------------------------
# The vLLM engine reads config.json itself (before vLLM builds anything, to choose vLLM's arguments); the
# reference engine and the plugin hold config objects. One set of readers serves both, so both find the same facts.
def _field(source: Any, name: str) -> Any:
    if source is None:
        return None
    return source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)


def text_config(config: Any) -> Any:
    """The language model's config: `text_config` where the model nests one, else the config itself."""
    if isinstance(config, Mapping):
        return config.get("text_config") or config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def image_token_id(config: Any) -> int | None:
    """The id of the image token that marks `e` (configs name it `image_token_id` or, older, `image_token_index`)."""
    token = _field(config, "image_token_id")
    if token is None:
        token = _field(config, "image_token_index")
    return None if token is None else int(token)


def eos_token_ids(config: Any, generation_config: Any = None, tokenizer: Any = None) -> tuple[int, ...]:
    """Every id that ends a generation, first the language model's own (the text config's EOS, or the model
    config's where the text config names none), then the generation config's, then the tokenizer's; no
    repeats. Both engines stop on all of them; the plugin ends a dissolved contrast row with the first."""
    ids: list[int] = []
    own = _field(text_config(config), "eos_token_id")
    if own is None:
        own = _field(config, "eos_token_id")
    for eos in (own, _field(generation_config, "eos_token_id"), _field(tokenizer, "eos_token_id")):
        for token in [eos] if isinstance(eos, int) else (eos or []):
            if int(token) not in ids:
                ids.append(int(token))
    return tuple(ids)


# ---- prompts ----------------------------------------------------------------------------------------------
def image_parts(messages: list[dict[str, Any]]) -> int:
    """How many image parts the messages hold (each request must bring as many images)."""
    return sum(
        1 for m in messages if isinstance(m.get("content"), list) for p in m["content"] if p.get("type") == "image"
    )


def render_prompt(processor: Any, messages: list[dict[str, Any]]) -> str:
    """The prompt text of a chat in the model's own format (its processor's chat template), ending where the
    assistant's answer begins; the processor then expands each image placeholder into the image tokens."""
    return str(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


# ---- adapters: behaviour of a loaded model's inputs ---------------------------------------------------------
class Family:
    """The reference engine's view of one loaded model: LLaVA-1.5's behaviour; subclasses fill in what differs."""

    def __init__(self, config: Any, spec: FamilySpec) -> None:
        self.config = config
        self.spec = spec
        token = image_token_id(config)
        if token is None:
            raise ValueError(f"{config.model_type}: config names no image token id")
        self.image_token_id = token
        self.num_layers = int(text_config(config).num_hidden_layers)

    @property
    def other_is_image_only(self) -> bool:
        return self.spec.other_is_image_only

    def image_layout(self, input_ids: torch.Tensor) -> ImageLayout:
        """Locate the image tokens of a 1-D prompt (after the processor expanded the placeholders)."""
        mask = input_ids == self.image_token_id
        idx = mask.nonzero()
        last = int(idx[-1, 0]) if idx.numel() else -1
        return ImageLayout(last_image=last, image_mask=mask)

    def collate(self, encodings: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
        """Left-pad token tensors and stack the image tensors of several single-prompt encodings."""
        width = max(int(enc["input_ids"].shape[-1]) for enc in encodings)
        ids = [
            F.pad(enc["input_ids"].reshape(-1), (width - enc["input_ids"].shape[-1], 0), value=pad_id)
            for enc in encodings
        ]
        mask = [
            F.pad(enc["attention_mask"].reshape(-1), (width - enc["attention_mask"].shape[-1], 0), value=0)
            for enc in encodings
        ]
        batch = {"input_ids": torch.stack(ids), "attention_mask": torch.stack(mask)}
        batch.update(self._collate_images(encodings, width))
        return batch

    def _collate_images(self, encodings: list[dict[str, torch.Tensor]], width: int) -> dict[str, torch.Tensor]:
        pixels = [enc["pixel_values"] for enc in encodings if "pixel_values" in enc]
        return {"pixel_values": torch.cat(pixels)} if pixels else {}

    def prefill_positions(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids for the prompt and a per-row offset for later tokens (0 outside M-RoPE)."""
        mask = batch["attention_mask"]
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos, torch.zeros(mask.shape[0], dtype=torch.long)

    def decode_positions(self, lengths: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Position ids `[B, 1]` (or `[3, B, 1]`) of the token at 0-based unpadded index `lengths`."""
        return (lengths + offsets)[:, None]


class LlavaNextFamily(Family):
    def _collate_images(self, encodings: list[dict[str, torch.Tensor]], width: int) -> dict[str, torch.Tensor]:
        with_images = [enc for enc in encodings if "pixel_values" in enc]
        if not with_images:
            return {}
        # Each image has its own number of crops; pad to the most, the model strips padding by image_sizes.
        most = max(int(enc["pixel_values"].shape[1]) for enc in with_images)
        pixels = [
            F.pad(enc["pixel_values"], (0, 0, 0, 0, 0, 0, 0, most - enc["pixel_values"].shape[1]))
            for enc in with_images
        ]
        return {"pixel_values": torch.cat(pixels), "image_sizes": torch.cat([e["image_sizes"] for e in with_images])}


class QwenFamily(Family):
    def _collate_images(self, encodings: list[dict[str, torch.Tensor]], width: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        types = [
            F.pad(enc["mm_token_type_ids"].reshape(-1), (width - enc["mm_token_type_ids"].shape[-1], 0))
            if "mm_token_type_ids" in enc
            else torch.zeros(width, dtype=torch.int)
            for enc in encodings
        ]
        out["mm_token_type_ids"] = torch.stack(types)
        with_images = [enc for enc in encodings if "pixel_values" in enc]
        if with_images:
            out["pixel_values"] = torch.cat([enc["pixel_values"] for enc in with_images])
            out["image_grid_thw"] = torch.cat([enc["image_grid_thw"] for enc in with_images])
        return out

    def prefill_positions(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "image_grid_thw" not in batch:
            pos, offsets = super().prefill_positions(model, batch)
            return pos[None].expand(3, -1, -1), offsets
        positions, deltas = model.model.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
        return positions, deltas.reshape(-1).long()

    def decode_positions(self, lengths: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return (lengths + offsets)[None, :, None].expand(3, -1, -1)


# ---- the specs ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FamilySpec:
    """The facts of one model family, keyed by its Hugging Face `model_type`."""

    model_type: str
    architecture: str  # the transformers model class; vLLM picks its implementation by this name too
    adapter: type[Family]  # collation and positions in the reference engine
    other_is_image_only: bool  # "other" keys: the image-token span only (True) or every key up to e (False)
    image_token: str  # the token whose last position is e; the processor expands each placeholder into many
    eos_token: str  # the end of an assistant turn in the family's chat format
    chat_template: str  # the family's prompt format (see LLAVA_CHAT_TEMPLATE)
    # Weights saved under llava-hf's key names (`language_model.model.*`), the only LLaVA layout vLLM 0.32
    # loads; other families are saved as transformers names them (sevi.testing.tiny.save_model_dir).
    llava_hf_keys: bool = False

    def adapt(self, config: Any) -> Family:
        """The adapter for a loaded model of this family."""
        return self.adapter(config, self)


# Written out in full, one spec per model type, so that each reads on its own.
SPECS: Mapping[str, FamilySpec] = MappingProxyType(
    {
        spec.model_type: spec
        for spec in (
            FamilySpec(
                model_type="llava",
                architecture="LlavaForConditionalGeneration",
                adapter=Family,
                other_is_image_only=False,
                image_token="<image>",
                eos_token="</s>",
                chat_template=LLAVA_CHAT_TEMPLATE,
                llava_hf_keys=True,
            ),
            FamilySpec(
                model_type="llava_next",
                architecture="LlavaNextForConditionalGeneration",
                adapter=LlavaNextFamily,
                other_is_image_only=False,
                image_token="<image>",
                eos_token="</s>",
                chat_template=LLAVA_CHAT_TEMPLATE,
                llava_hf_keys=True,
            ),
            FamilySpec(
                model_type="qwen2_vl",
                architecture="Qwen2VLForConditionalGeneration",
                adapter=QwenFamily,
                other_is_image_only=True,
                image_token="<|image_pad|>",
                eos_token="<|im_end|>",
                chat_template=QWEN_CHAT_TEMPLATE,
            ),
            FamilySpec(
                model_type="qwen2_5_vl",
                architecture="Qwen2_5_VLForConditionalGeneration",
                adapter=QwenFamily,
                other_is_image_only=True,
                image_token="<|image_pad|>",
                eos_token="<|im_end|>",
                chat_template=QWEN_CHAT_TEMPLATE,
            ),
        )
    }
)


def find_spec(model_type: str | None) -> FamilySpec | None:
    """The spec of `model_type`, or None for a model this module does not know."""
    return SPECS.get(model_type) if model_type is not None else None


def spec_for(model_type: str | None) -> FamilySpec:
    """The spec of `model_type`; a ValueError naming the supported types for any other."""
    spec = find_spec(model_type)
    if spec is None:
        raise ValueError(f"unsupported model type {model_type!r}; supported: {', '.join(SPECS)}")
    return spec


def family_for(config: Any) -> Family:
    """The adapter for a loaded model's config."""
    return spec_for(config.model_type).adapt(config)
