"""What vLLM's front end knows of the served model, for the logits processor's `validate_params`: its depth and
its knob map (the folder's `sevi_presets.json`, else the paper's map).

vLLM calls `validate_params` with a request's SamplingParams alone, in the front-end process (`vllm serve`'s
API server, or an `LLM` / `AsyncLLM` in the caller's process), where no worker and no logits processor exist.
Every such front end builds one `InputProcessor` per engine, with the engine's config, before it admits any
request: :func:`install` wraps its constructor so that the served model is recorded there, once (the presets
file read then: a bad file stops the front end's start-up, naming the field). One served model per process:
with two engines of different models in one process, the last built is the one raw knobs resolve against
(sevi-serve's own engines send resolved rows, which need no model).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sevi.families import text_config
from sevi.method.knob import KnobMap, load_knob_map


@dataclass(frozen=True)
class ServedModel:
    num_layers: int
    knob_map: KnobMap


_served: ServedModel | None = None


def configure(model: str, hf_config: Any) -> ServedModel:
    """Record the served model: `model` is its folder (or hub id, which has no presets file)."""
    global _served
    _served = ServedModel(int(text_config(hf_config).num_hidden_layers), load_knob_map(model))
    return _served


def served() -> ServedModel | None:
    return _served


def reset() -> None:
    global _served
    _served = None


def install() -> None:
    """Wrap `InputProcessor.__init__` (idempotent). Called from the plugin's `register`, which vLLM runs in every
    process before it builds an engine."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.__init__
    if getattr(original, "_sevi_front_end", False):
        return

    @functools.wraps(original)
    def __init__(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        configure(vllm_config.model_config.model, vllm_config.model_config.hf_config)
        original(self, vllm_config, *args, **kwargs)

    __init__._sevi_front_end = True  # type: ignore[attr-defined]
    InputProcessor.__init__ = __init__  # type: ignore[method-assign]
