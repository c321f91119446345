"""The token choice both engines share: OpenAI's presence / frequency penalties, then greedy or a seeded draw.

The reference engine (`models.generation`) chooses every token here. The vLLM engine chooses the tokens
of contrastive-decoding pairs here too (its logits processor combines the pair's logits, so vLLM's own
sampler only ever sees the forced result), and leaves the other rows to vLLM's sampler, whose penalties
are the same arithmetic in the same order (`vllm.model_executor.layers.utils.apply_penalties`): greedy
tokens agree between the engines, penalties or not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def has_penalties(presence: float, frequency: float) -> bool:
    return presence != 0.0 or frequency != 0.0


def apply_penalties(logits: torch.Tensor, output_ids: Sequence[int], presence: float, frequency: float) -> torch.Tensor:
    """`logits[t] -= frequency * count(t) + presence * (count(t) > 0)` over the generated tokens (OpenAI's
    definition); `[V]` float32 logits, in place, returned.

    Frequency first, then presence, as vLLM subtracts them: float32 rounding then gives the same logits, so a
    greedy argmax cannot differ between the engines on a near tie.
    """
    if not output_ids or not has_penalties(presence, frequency):
        return logits
    counts = torch.bincount(_ids_on(logits.device, output_ids), minlength=logits.shape[-1])[: logits.shape[-1]]
    logits -= counts * frequency  # Python scalars: no tensor is made for them on the device
    logits -= (counts > 0) * presence
    return logits


def _ids_on(device: torch.device, ids: Sequence[int]) -> torch.Tensor:
    """Token ids on `device`; on a GPU through pinned memory, as vLLM uploads its own: a copy from pageable memory
    would wait for the device's queue."""
    if device.type == "cuda":
        return torch.tensor(ids, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)
    return torch.as_tensor(ids, dtype=torch.long, device=device)


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One draw from `[V]` logits at `temperature` with nucleus `top_p`, on the CPU with `generator`: the same
    draw for the same seed in both engines (a pair's draw in the vLLM engine is this function too)."""
    probs = torch.softmax(logits.float().cpu() / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator)[0])
