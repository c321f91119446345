"""Image drop: a training-only mask that hides the image tokens from the text side in the upper layers.

In LLaVA-1.5 the upper layers read the image through the text side (the instruction after the image and
the tokens generated so far), hardly through the image tokens themselves; that is the information flow
SEVI leans on. A small model trained on captions alone reads the image tokens directly at every depth.
With image drop, in a share of the training samples every position after the image cannot attend to the
image tokens from layer `from_layer` up; the lower layers read the image as always. The model then has to
carry the image into the text positions early, and its upper layers learn to read it there.

Only training attends this way: the saved model folder is a stock LLaVA (`detach` before saving), which
transformers and vLLM serve with their own attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

ATTN_NAME = "image_drop"
_active: ImageDrop | None = None  # the drop of the batch being trained on; read by `attention`


@dataclass
class ImageDrop:
    share: float  # of the samples of each batch
    from_layer: int  # first decoder layer whose text side cannot read the image
    seed: int = 0
    blocked: torch.Tensor | None = None  # [batch, query, key] True = hidden, for the current batch

    def attach(self, model: Any) -> None:
        """Route the decoder's attention through `attention` with this drop."""
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        global _active
        AttentionInterface.register(ATTN_NAME, attention)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
        model.config.get_text_config(decoder=True)._attn_implementation = ATTN_NAME
        _active = self

    def detach(self, model: Any) -> None:
        """Stock attention again (before saving the model folder, and for evaluation)."""
        model.config.get_text_config(decoder=True)._attn_implementation = "sdpa"

    def choose(self, input_ids: torch.Tensor, image_token_id: int, step: int) -> None:
        """Pick this step's samples (seeded by the step, so a resumed run picks the same ones)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        chosen = torch.rand(input_ids.shape[0], generator=gen) < self.share
        self.blocked = blocks(input_ids, image_token_id, chosen)


def blocks(input_ids: torch.Tensor, image_token_id: int, chosen: torch.Tensor) -> torch.Tensor:
    """[batch, seq, seq]: for the chosen rows, positions after the last image token may not read image tokens."""
    is_image = input_ids == image_token_id
    pos = torch.arange(input_ids.shape[1])
    last = torch.where(is_image, pos, -1).amax(dim=1)
    after = pos[None, :] > last[:, None]
    return chosen[:, None, None] & after[:, :, None] & is_image[:, None, :]


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA, with the active drop's image keys hidden in layers >= its `from_layer`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    drop = _active
    if drop is not None and drop.blocked is not None and getattr(module, "layer_idx", -1) >= drop.from_layer:
        q_len, k_len = query.shape[2], key.shape[2]
        if attention_mask is None:  # SDPA's causal fast path: spell the causal mask out
            causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
            attention_mask = causal[None, None].expand(query.shape[0], 1, q_len, k_len)
        hidden = drop.blocked[:, None, -q_len:, -k_len:]
        if attention_mask.dtype == torch.bool:
            attention_mask = attention_mask & ~hidden
        else:
            attention_mask = attention_mask.masked_fill(hidden, torch.finfo(attention_mask.dtype).min)
        kwargs.pop("is_causal", None)
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out, None
