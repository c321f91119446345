"""Cross-image contrastive decoding (CICD, spec section 3): one step on a batch of logit rows. Torch only."""

from __future__ import annotations

import math

import torch

ALPHA_MAX = 3.0
JSD_THRESHOLD = 1e-4
BETA = 0.1


def jensen_shannon(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """JSD(softmax(a), softmax(b)) per row, natural log, float32. Shapes `[R, V]` -> `[R]`."""
    log_p = torch.log_softmax(logits_a.float(), dim=-1)
    log_q = torch.log_softmax(logits_b.float(), dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    p, q = log_p.exp(), log_q.exp()
    # xlogy-style: terms where p == 0 contribute 0, never NaN.
    kl_pm = torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > 0, q * (log_q - log_m), torch.zeros_like(q)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def contrast_logits(
    main: torch.Tensor,
    contrast: torch.Tensor,
    *,
    alpha_max: float = ALPHA_MAX,
    jsd_threshold: float = JSD_THRESHOLD,
    beta: float = BETA,
) -> torch.Tensor:
    """Combine main-image logits `a` with contrast-image logits `b`, row by row.

    `d = min(1, JSD)`, `alpha = min(alpha_max, 1 - log10 d)`; rows with `d > threshold` get
    `(1 + alpha) a - alpha b`, the others keep `a`; then tokens with `a < log(beta) + max(a)` are cut.
    Returns float32 logits.
    """
    a = main.float()
    b = contrast.float()
    d = jensen_shannon(a, b).clamp(max=1.0)
    alpha = torch.clamp(1.0 - torch.log10(d.clamp(min=1e-30)), max=alpha_max)[:, None]
    mixed = torch.where((d > jsd_threshold)[:, None], (1.0 + alpha) * a - alpha * b, a)
    cutoff = math.log(beta) + a.amax(-1, keepdim=True)
    return mixed.masked_fill(a < cutoff, float("-inf"))
