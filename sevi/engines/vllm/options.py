"""The vLLM engine's options: the `vllm` group of the server's settings tree (`--vllm.*` or `SEVI_VLLM_*`),
here so that the engine never imports the server; `server.settings.Settings` composes it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class VllmSettings(BaseSettings):
    """vLLM engine (`--engine vllm`); each also `SEVI_VLLM_<FIELD>`, e.g. SEVI_VLLM_TENSOR_PARALLEL_SIZE=2."""

    # A BaseSettings of its own so that `VllmSettings(...)` alone (tests, bench/) still reads SEVI_VLLM_*; inside
    # Settings the root reads the environment for it (_GroupEnvSource), under the command line.
    model_config = SettingsConfigDict(env_prefix="SEVI_VLLM_", extra="ignore")

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model replica (tensor parallel).")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages (e.g. one per node).")
    distributed_executor_backend: Literal["uni", "mp", "ray"] | None = Field(
        None,
        description="Executor: 'uni' (in this process; one GPU's default), 'mp' (worker processes; the CPU's default, "
        "as vLLM's), 'ray' (several nodes).",
    )
    max_model_len: int | None = Field(None, ge=16, description="Context length (default: the model's).")
    cpu_kv_cache_gib: int = Field(1, ge=1, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    enforce_eager: bool = Field(
        False,
        description="No torch.compile / CUDA graphs: starts 10-60 s sooner, "
        "decodes ~15% slower on CPU (measured in bench/engines.py).",
    )
    prefix_caching: bool = Field(
        True,
        description="Prefix cache (aligned requests cache only the blocks before "
        "their last prompt row: sevi/engines/vllm/plugin/scheduler.py).",
    )
    seed: int = Field(0, description="vLLM's engine seed.")
    engine_core: Literal["thread", "process"] = Field(
        "thread",
        description="Where vLLM's engine core runs: 'thread' (LLMEngine stepped in a thread of the server) or "
        "'process' (AsyncLLM, the engine core in its own process as `vllm serve` runs it; sevi/engines/"
        "vllm_process.py).",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further vLLM EngineArgs as JSON, e.g. SEVI_VLLM_ENGINE_ARGS='{\"max_num_batched_tokens\": 4096}'.",
    )
    disable: bool = Field(
        False,
        description="Leave vLLM's attention stock: no SEVI at all (benchmarks, debugging). "
        "Read by the plugin in every vLLM process, so also honoured by `vllm serve`.",
    )


# The name tests and bench/ construct the group by.
VllmOptions = VllmSettings
