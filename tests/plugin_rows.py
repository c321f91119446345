"""Shared by the plugin's unit tests: a logits processor on a small LLaVA config and rows added to it, which
fills the worker state (models/vllm_plugin/state.py) as vLLM's batch updates would."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from transformers import LlavaConfig
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate

from models.vllm_plugin.logits_processor import SeviLogitsProcessor

IMAGE = 5
EOS = 2


def processor(layers: int = 4) -> SeviLogitsProcessor:
    cfg = LlavaConfig(image_token_index=IMAGE)
    text: Any = cfg.text_config  # a config object once built (typed as a union with its dict form)
    text.num_hidden_layers = layers
    text.eos_token_id = EOS
    return SeviLogitsProcessor(SimpleNamespace(model_config=SimpleNamespace(hf_config=cfg)),  # type: ignore[arg-type]
                               torch.device("cpu"), False)


def add_rows(proc: SeviLogitsProcessor, rows: list[tuple[int, dict[str, object] | None, list[int], list[int]]],
             size: int) -> None:
    """Rows (batch index, SEVI extra args or None, prompt ids, output ids so far) joining a batch of `size`."""
    added = [(i, SamplingParams(temperature=0.0, extra_args=extra), prompt, out) for i, extra, prompt, out in rows]
    proc.update_state(BatchUpdate(batch_size=size, removed=[], added=added, moved=[]))
