"""sevi-serve's vLLM plugin: SEVI inside vLLM's paged, batched attention, per request.

Loaded by vLLM in every process that builds a model (front end, engine core, each worker, the model
inspection subprocess) through the `vllm.general_plugins` entry point :func:`register`; the logits
processor comes in through the `vllm.logits_processors` entry point. Pieces:

- :mod:`.params`: the resolved row in `SamplingParams.extra_args`, its encoder / decoder, and the front end's
  resolution of a `vllm serve` user's raw knob (with :mod:`.front_end`: the served model's depth and presets);
- :mod:`.logits_processor`: `validate_params` (resolve once, HTTP 400), `update_state` (decoded row -> worker state),
  `apply` (contrastive decoding pairs);
- :mod:`.state`: the row table, the one thing the logits processor hands over to the attention side;
- :mod:`.plan`: which rows to align in a step, and what their layers share (one plan for both backends);
- :mod:`.step`: the step plan built once per step in the backends' metadata builders, carried to the layers in
  their typed metadata;
- :mod:`.rows`: the aligned attention of a layer, the one place its kernel is chosen and called: the C
  kernel with its bound calls (:mod:`.bound_layer`), Triton (:mod:`sevi.kernels.sevi_decode`) or torch
  (:mod:`.paged_read`);
- :mod:`.telemetry`: the one channel the engines read the workers' telemetry through;
- :mod:`.cpu_backend` (CPU_ATTN, tested) and :mod:`.gpu_backend` (FLASH_ATTN, not yet run on a GPU).
"""

from __future__ import annotations

from sevi.runtime import runtime_env

# vLLM's own module path for the processor (FQCN form it accepts in `logits_processors=`).
LOGITS_PROCESSOR = "sevi.engines.vllm.plugin.logits_processor:SeviLogitsProcessor"
# "1": leave vLLM's attention stock (benchmarks, debugging); the server's --vllm.disable exports it.
DISABLE_ENV = runtime_env.PLUGIN_DISABLE

_registered = False


def register() -> None:
    """The `vllm.general_plugins` entry point. Idempotent; vLLM may call it in many processes."""
    global _registered
    if _registered:
        return
    _registered = True
    # Importing `sevi` defines the torchvision op schemas before anything imports torchvision (PyPI's
    # torchvision wheel is a CUDA build; see sevi/runtime/torchvision_compat.py). vLLM loads general plugins
    # before it imports model code, in every process, so this is the one place that reaches them all.
    import sevi  # noqa: F401

    # Model Runner V2 (on by default on GPUs with Triton) has another logits-processor API.
    runtime_env.prefer_vllm_model_runner_v1()
    # The front end records the served model (depth, presets) for validate_params, which resolves a
    # `vllm serve` user's knob once; stock attention or not, the knob is checked there.
    from sevi.engines.vllm.plugin import front_end

    front_end.install()
    # The environment, not the server's settings: vLLM calls this in processes the server's objects never reach.
    if runtime_env.current().plugin_disabled:
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        runtime_env.prefer_vllm_inductor_cache()  # before vLLM compiles the model, in each of its processes
        register_backend(AttentionBackendEnum.CPU_ATTN, "sevi.engines.vllm.plugin.cpu_backend.SeviCPUAttentionBackend")
    elif current_platform.is_cuda():
        register_backend(
            AttentionBackendEnum.FLASH_ATTN, "sevi.engines.vllm.plugin.gpu_backend.SeviFlashAttentionBackend"
        )
