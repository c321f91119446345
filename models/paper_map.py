"""The paper's knob map (LLaVA-1.5-7B presets, spec section 5): conservativeness c -> omega and start layer.

The default map of every model without a presets file of its own (models/presets.py), and what
models/conservativeness.py resolves requests with. Kappa stays at the paper's 0.2.
"""

from __future__ import annotations

import math

DEFAULT_KAPPA = 0.2
BALANCED_OMEGA = 0.5
FOCUSED_OMEGA = 4.0
# Start layer as a share of depth: 8/32 up to Balanced, moving to 4/32 at Focused (LLaVA-1.5-7B presets).
BALANCED_START_FRACTION = 8 / 32
FOCUSED_START_FRACTION = 4 / 32


def omega_for(c: float) -> float:
    """Linear 0 -> 0.5 on [0, 0.5], geometric 0.5 -> 4 on [0.5, 1]: continuous and increasing."""
    if c <= 0.5:
        return BALANCED_OMEGA * (c / 0.5)
    return BALANCED_OMEGA * (FOCUSED_OMEGA / BALANCED_OMEGA) ** ((c - 0.5) / 0.5)


def start_layer_for(c: float, num_layers: int) -> int:
    """Non-increasing in c: 8/32 of the depth up to c = 0.5, then linearly to 4/32 at c = 1."""
    if c <= 0.5:
        fraction = BALANCED_START_FRACTION
    else:
        t = (c - 0.5) / 0.5
        fraction = BALANCED_START_FRACTION + t * (FOCUSED_START_FRACTION - BALANCED_START_FRACTION)
    return int(math.floor(fraction * num_layers + 0.5))
