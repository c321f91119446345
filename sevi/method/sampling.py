"""The token choice both engines share: OpenAI's presence / frequency penalties, then greedy or a seeded draw.

The reference engine (`sevi.engines.reference.generation`) chooses every token here. The vLLM engine chooses the tokens
of contrastive-decoding pairs here too (its logits processor combines the pair's logits, so vLLM's own
sampler only ever sees the forced result), and leaves the other rows to vLLM's sampler, whose penalties
are the same arithmetic in the same order (`vllm.model_executor.layers.utils.apply_penalties`): greedy
tokens agree between the engines, penalties or not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def has_penalties(presence: float, frequency: float, repetition: float = 1.0) -> bool:
    return presence != 0.0 or frequency != 0.0 or repetition != 1.0


def apply_penalties(
    logits: torch.Tensor,
    output_ids: Sequence[int],
    presence: float,
    frequency: float,
    repetition: float = 1.0,
    prompt_ids: Sequence[int] = (),
) -> torch.Tensor:
    """vLLM's repetition penalty over the prompt and generated tokens (a positive logit divided by it, another
    multiplied), then `logits[t] -= frequency * count(t) + presence * (count(t) > 0)` over the generated tokens
    (OpenAI's definition); `[V]` float32 logits, in place, returned.

    Repetition, frequency, then presence, as vLLM applies them: float32 rounding then gives the same logits, so a
    greedy argmax cannot differ between the engines on a near tie.
    """
    if repetition != 1.0 and (output_ids or prompt_ids):
        seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        ids = _ids_on(logits.device, [*prompt_ids, *output_ids])
        seen[ids[ids < logits.shape[-1]]] = True
        # As vLLM computes it (vllm._custom_ops.apply_repetition_penalties_torch): a float32 factor 1 / p or p.
        penalties = torch.where(seen, torch.tensor(repetition, dtype=logits.dtype, device=logits.device), 1.0)
        logits *= torch.where(logits > 0, 1.0 / penalties, penalties)
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


def block_tokens(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """`[V]` logits with `token_ids` made impossible, in place (vLLM's min_tokens: no stop token yet)."""
    ids = [t for t in token_ids if 0 <= t < logits.shape[-1]]
    if ids:
        logits[_ids_on(logits.device, ids)] = float("-inf")
    return logits


def sample_token(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
    top_k: int = 0,
    min_p: float = 0.0,
) -> int:
    """One draw from `[V]` logits at `temperature`, then vLLM's `min_p`, `top_k` and nucleus `top_p` filters (in
    vLLM's order), on the CPU with `generator`: the same draw for the same seed in both engines (a pair's draw in
    the vLLM engine is this function too)."""
    probs = torch.softmax(logits.float().cpu() / temperature, -1)
    filtered = False
    if min_p > 0.0:
        probs, filtered = torch.where(probs < min_p * probs.max(), torch.zeros_like(probs), probs), True
    if 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k).values[-1]
        probs, filtered = torch.where(probs < kth, torch.zeros_like(probs), probs), True
    if top_p < 1.0:
        if filtered:  # the nucleus is a share of what the filters kept
            probs = probs / probs.sum()
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator)[0])
