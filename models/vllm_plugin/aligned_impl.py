"""What the CPU and GPU SEVI attention impls share: the layer's facts and this step's rows to align.

Mixed into each backend's impl class ahead of vLLM's own (`class SeviCPUAttentionImpl(AlignedImpl,
CPUAttentionBackendImpl)`): it reads the attributes vLLM's impls set (`attn_type`, `alibi_slopes`,
`sliding_window`, `logits_soft_cap`, `sinks`) and adds no constructor.
"""

from __future__ import annotations

from typing import Any

import torch

from models.vllm_plugin.plan import RowSet, StepPlan, layer_index, step_plan
from models.vllm_plugin.state import STATE

_NO_WINDOW = (-1, None, (-1, -1))  # vLLM's spellings of "no sliding window" (CPU and FlashAttention)


class AlignedImpl:
    _layer: int | None = None  # decoder layer number; None: not a layer SEVI aligns (encoder, unnamed)
    _layer_known = False
    _plain = False  # plain causal attention, the only kind the recomputation reproduces

    def _plan_rows(
        self, layer: Any, md: Any, kv_cache: torch.Tensor, device: torch.device
    ) -> tuple[StepPlan | None, RowSet | None]:
        """This step's plan (`md`: the metadata `step_plan` reads) and this layer's rows to align; (None, None)
        when no row of the batch asks for SEVI or this is not a decoder layer, (plan, None) when none here.
        The cache's shape is read only then: vLLM's profiling and compile runs pass a placeholder."""
        if md is None or not STATE.rows:
            return None, None
        if not self._layer_known:
            self._know(layer)
        if self._layer is None:
            return None, None
        plan = step_plan(STATE, md, kv_cache.shape[2], device)  # the block size in both backends' layouts
        return plan, (plan.rows_at(self._layer) if plan is not None else None)

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
