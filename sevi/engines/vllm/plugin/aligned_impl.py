"""What the CPU and GPU SEVI attention impls share: the layer's facts and this step's rows to align.

Mixed into each backend's impl class ahead of vLLM's own (`class SeviCPUAttentionImpl(AlignedImpl,
CPUAttentionBackendImpl)`): it reads the attributes vLLM's impls set (`attn_type`, `alibi_slopes`,
`sliding_window`, `logits_soft_cap`, `sinks`) and adds no constructor.
"""

from __future__ import annotations

from typing import Any

from sevi.engines.vllm.plugin.plan import RowSet, StepPlan, layer_index
from sevi.engines.vllm.plugin.step import SeviStep

_NO_WINDOW = (-1, None, (-1, -1))  # vLLM's spellings of "no sliding window" (CPU and FlashAttention)


class AlignedImpl:
    _layer: int | None = None  # decoder layer number; None: not a layer SEVI aligns (encoder, unnamed)
    _layer_known = False
    _plain = False  # plain causal attention, the only kind the recomputation reproduces

    def _plan_rows(self, layer: Any, step: SeviStep | None) -> tuple[StepPlan | None, RowSet | None]:
        """This step's plan (built by the metadata builder: `step`, the metadata's `sevi` field) and this layer's
        rows to align; (None, None) when no row of the batch is aligned or this is not a decoder layer,
        (plan, None) when none is here."""
        if step is None or step.plan is None:
            return None, None
        if not self._layer_known:
            self._know(layer)
        if self._layer is None:
            return None, None
        return step.plan, step.plan.rows_at(self._layer)

    def _know(self, layer: Any) -> None:
        """What does not change between steps, found at the first forward (the layer name comes with it)."""
        decoder = getattr(self, "attn_type", "decoder") == "decoder"
        self._layer = layer_index(getattr(layer, "layer_name", "")) if decoder else None
        self._plain = (
            getattr(self, "alibi_slopes", None) is None
            and getattr(self, "sliding_window", None) in _NO_WINDOW
            and not getattr(self, "logits_soft_cap", None)
            and getattr(self, "sinks", None) is None
        )
        self._layer_known = True
