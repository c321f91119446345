"""Model-family adapters: where the image sits in a sequence, batching of processor outputs, positions.

LLaVA-1.5 / LLaVA-NeXT: `e` is the last image token, and "other" keys are every key up to `e`.
Qwen2-VL / Qwen2.5-VL: `e` is the last image-pad token, and "other" keys are the image-pad span only;
positions are 3-D (M-RoPE) with a per-sequence offset for the tokens after the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ImageLayout:
    """Where the image tokens of one prompt are: `last_image` (e, -1 if none) and a bool mask per token."""

    last_image: int
    image_mask: torch.Tensor


class Family:
    """Behaviour shared by all families; subclasses fill in what differs."""

    name = "base"
    other_is_image_only = False
    model_types: tuple[str, ...] = ()

    def __init__(self, config: Any) -> None:
        self.config = config
        token = getattr(config, "image_token_id", None)
        if token is None:
            token = getattr(config, "image_token_index", None)
        if token is None:
            raise ValueError(f"{config.model_type}: config names no image token id")
        self.image_token_id = int(token)
        self.num_layers = int(config.get_text_config(decoder=True).num_hidden_layers)

    def image_layout(self, input_ids: torch.Tensor) -> ImageLayout:
        """Locate the image tokens of a 1-D prompt (after the processor expanded the placeholders)."""
        mask = input_ids == self.image_token_id
        idx = mask.nonzero()
        last = int(idx[-1, 0]) if idx.numel() else -1
        return ImageLayout(last_image=last, image_mask=mask)

    def collate(self, encodings: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
        """Left-pad token tensors and stack the image tensors of several single-prompt encodings."""
        width = max(int(enc["input_ids"].shape[-1]) for enc in encodings)
        ids = [F.pad(enc["input_ids"].reshape(-1), (width - enc["input_ids"].shape[-1], 0), value=pad_id)
               for enc in encodings]
        mask = [F.pad(enc["attention_mask"].reshape(-1), (width - enc["attention_mask"].shape[-1], 0), value=0)
                for enc in encodings]
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


class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)


class LlavaNextFamily(Family):
    name = "llava_next"
    model_types = ("llava_next",)

    def _collate_images(self, encodings: list[dict[str, torch.Tensor]], width: int) -> dict[str, torch.Tensor]:
        with_images = [enc for enc in encodings if "pixel_values" in enc]
        if not with_images:
            return {}
        # Each image has its own number of crops; pad to the most, the model strips padding by image_sizes.
        most = max(int(enc["pixel_values"].shape[1]) for enc in with_images)
        pixels = [F.pad(enc["pixel_values"], (0, 0, 0, 0, 0, 0, 0, most - enc["pixel_values"].shape[1]))
                  for enc in with_images]
        return {"pixel_values": torch.cat(pixels), "image_sizes": torch.cat([e["image_sizes"] for e in with_images])}


class QwenFamily(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    other_is_image_only = True

    def _collate_images(self, encodings: list[dict[str, torch.Tensor]], width: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        types = [F.pad(enc["mm_token_type_ids"].reshape(-1), (width - enc["mm_token_type_ids"].shape[-1], 0))
                 if "mm_token_type_ids" in enc else torch.zeros(width, dtype=torch.int)
                 for enc in encodings]
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
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"],
        )
        return positions, deltas.reshape(-1).long()

    def decode_positions(self, lengths: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return (lengths + offsets)[None, :, None].expand(3, -1, -1)


_FAMILIES: tuple[type[Family], ...] = (LlavaFamily, LlavaNextFamily, QwenFamily)


def family_for(config: Any) -> Family:
    for cls in _FAMILIES:
        if config.model_type in cls.model_types:
            return cls(config)
    supported = ", ".join(t for cls in _FAMILIES for t in cls.model_types)
    raise ValueError(f"unsupported model type {config.model_type!r}; supported: {supported}")
