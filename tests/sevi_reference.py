"""A plain per-row, per-head loop implementation of spec section 2, written for the tests only.

Deliberately naive (Python loops, one head and one key at a time) so that it shares no code and no
vectorisation tricks with `sevi/method/alignment.py`.
"""

from __future__ import annotations

import math

import torch


def align_row_loop(
    s: list[list[float]], keys: list[int], semantic: set[int], other: set[int], omega: float, kappa: float
) -> list[list[float]]:
    """Align one query row. s[h][j] are pre-softmax scores over `keys` (the valid key indices, in order)."""
    n_heads = len(s)
    groups = []
    for h in range(n_heads):
        m = max(s[h])
        exps = [math.exp(x - m) for x in s[h]]
        z = sum(exps)
        p = [x / z for x in exps]
        sem_mass = sum(p[n] for n, j in enumerate(keys) if j in semantic)
        oth_mass = sum(p[n] for n, j in enumerate(keys) if j in other)
        if sem_mass >= oth_mass:
            peak = max((p[n] for n, j in enumerate(keys) if j in semantic), default=0.0)
            groups.append("core" if peak > kappa * sem_mass else "global")
        else:
            groups.append("other")
    out = [list(row) for row in s]
    glob = [h for h in range(n_heads) if groups[h] == "global"]
    core = [h for h in range(n_heads) if groups[h] == "core"]
    oth = [h for h in range(n_heads) if groups[h] == "other"]
    if glob and oth:
        for h in oth:
            for n in range(len(keys)):
                mean = sum(s[g][n] for g in glob) / len(glob)
                out[h][n] = (s[h][n] + omega * mean) / (1 + omega)
    if core and glob:
        for h in glob:
            for n in range(len(keys)):
                mx = max(s[c][n] for c in core)
                out[h][n] = (s[h][n] + omega * mx) / (1 + omega)
    return out


def loop_attention_row(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    keys: list[int],
    semantic: set[int],
    other: set[int],
    omega: float,
    kappa: float,
    aligned: bool,
) -> torch.Tensor:
    """Attention output `[H, D]` of one query row. q: [H, D]; k, v: [H, K, D] already expanded for GQA."""
    n_heads = q.shape[0]
    s = [[float((q[h] * k[h, j]).sum()) * scale for j in keys] for h in range(n_heads)]
    if aligned:
        s = align_row_loop(s, keys, semantic, other, omega, kappa)
    out = torch.zeros(n_heads, v.shape[-1], dtype=torch.float64)
    for h in range(n_heads):
        m = max(s[h])
        w = [math.exp(x - m) for x in s[h]]
        z = sum(w)
        for n, j in enumerate(keys):
            out[h] += (w[n] / z) * v[h, j].double()
    return out
