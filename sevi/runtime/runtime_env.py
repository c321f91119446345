"""The process environment, as the code below the server sees it: the only module of `sevi/` and `server/`
that reads or writes `os.environ` (`tests/server/test_settings_tree.py` holds the tree to that).

Why the environment at all: the server's settings tree (`server/settings.py`: `settings.kernels`,
`settings.vllm`) is passed down to the engines as an object, but vLLM runs this package's plugin in
processes that never see that object: its worker processes (the `mp` and `ray` executors), its
model-inspection subprocess, and its own `vllm serve` with the plugin installed. Those processes inherit
the environment, so the engines call :func:`export` with their settings before vLLM starts, and the code
that runs in every process (the kernel choice, the C kernel, the compiled operator, the plugin's
registration) reads its switches through :func:`current`. Variables of other programs that this package
sets or reads (Triton's interpreter, vLLM's runner and engine-core switches, the C compiler) are here too,
so that no other module touches the environment.

This module is stdlib only: the method layer imports it, and `sevi/` never imports `server/`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# SEVI's own variables (names kept from before the settings tree; users and tests set them).
ALIGNED_KERNEL = "SEVI_ALIGNED_KERNEL"  # c | triton | torch; unset: the machine's default (sevi/kernels/choice.py)
PAGED_KERNEL = "SEVI_PAGED_KERNEL"  # 0: vLLM on CPU reads the aligned rows' K/V by gather + bmm, not the C kernel
COMPILED_OPERATOR = "SEVI_COMPILED_OPERATOR"  # 0: the eager alignment operator on CPU, not the AOT-compiled one
KERNEL_CACHE = "SEVI_KERNEL_CACHE"  # folder of the code built at run time (sevi/kernels/build_cache.py)
PLUGIN_DISABLE = "SEVI_VLLM_DISABLE"  # 1: the plugin leaves vLLM's attention stock (benchmarks, debugging)

ALIGNED_KERNELS = ("triton", "c", "torch")
# The spellings pydantic reads as false, so that a value means the same in the server's settings and here.
_FALSE = frozenset({"0", "false", "f", "n", "no", "off"})


def default_kernel_cache() -> Path:
    return Path.home() / ".cache" / "sevi-serve"


@dataclass(frozen=True)
class RuntimeOptions:
    """The switches every process running SEVI's code reads (the server's `settings.kernels` and
    `settings.vllm.disable`, converted by `server.settings.Settings.runtime_options`)."""

    aligned_kernel: str | None = None  # one of ALIGNED_KERNELS, or None for the machine's default
    paged_kernel: bool = True
    compiled_operator: bool = True
    kernel_cache: Path = field(default_factory=default_kernel_cache)
    plugin_disabled: bool = False


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value not in _FALSE


def current() -> RuntimeOptions:
    """The switches of this process, from its environment (read on each call: callers that must not change
    their mind during a process cache what they derive, as sevi/kernels/choice.py does)."""
    kernel = os.environ.get(ALIGNED_KERNEL, "").strip().lower() or None
    cache = os.environ.get(KERNEL_CACHE, "").strip()
    return RuntimeOptions(
        aligned_kernel=kernel,
        paged_kernel=_flag(PAGED_KERNEL, True),
        compiled_operator=_flag(COMPILED_OPERATOR, True),
        kernel_cache=Path(cache) if cache else default_kernel_cache(),
        plugin_disabled=_flag(PLUGIN_DISABLE, False),
    )


def export(options: RuntimeOptions) -> None:
    """Put `options` into this process's environment, where vLLM's processes started after it inherit them
    and :func:`current` reads them. A default value removes its variable, so the environment holds only
    what differs from the defaults (and a variable the settings overrode is gone)."""
    defaults = RuntimeOptions()
    values: dict[str, str | None] = {
        ALIGNED_KERNEL: options.aligned_kernel,
        PAGED_KERNEL: None if options.paged_kernel == defaults.paged_kernel else str(int(options.paged_kernel)),
        COMPILED_OPERATOR: (
            None if options.compiled_operator == defaults.compiled_operator else str(int(options.compiled_operator))
        ),
        KERNEL_CACHE: None if options.kernel_cache == defaults.kernel_cache else str(options.kernel_cache),
        PLUGIN_DISABLE: "1" if options.plugin_disabled else None,
    }
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# ---- other programs' variables ---------------------------------------------------------------------------


def c_compiler() -> str:
    """The C compiler the build honours, as make does: `$CC`, else `cc`."""
    return os.environ.get("CC", "cc")


def triton_interpreting() -> bool:
    """Whether Triton runs its kernels in its interpreter (it reads TRITON_INTERPRET when it decorates them)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_compile_only() -> bool:
    """TRITON_INTERPRET=0 set explicitly: decorate the kernels for a GPU even without one, to compile them for
    one (bench/kernel_compile.py: Triton's own ptxas, no device) rather than run them."""
    return os.environ.get("TRITON_INTERPRET") == "0"


def use_triton_interpreter() -> None:
    """Have Triton interpret the kernels decorated from now on (no CUDA device to compile them for)."""
    os.environ["TRITON_INTERPRET"] = "1"


def prefer_vllm_model_runner_v1() -> None:
    """vLLM's Model Runner V2 (on by default on GPUs with Triton) has another logits-processor API than the
    plugin's; a value the user set is kept."""
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


def prefer_vllm_inductor_cache() -> None:
    """On a CPU, vLLM's torch.compile cache without its AOT artifacts (VLLM_USE_AOT_COMPILE=0), unless the user set
    it. vLLM 0.32 on CPU cannot load the AOT artifact it saved ("'function' object has no attribute
    'finalize_loading'", stock vLLM alike), so every start compiled the model again (bundled model: a warm restart
    ready in 45-84 s); through inductor's own cache a warm restart takes 24 s."""
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


def prepare_vllm_engine(cpu_kv_cache_gib: int) -> None:
    """Before the server's vLLM engine starts: vLLM's engine core in this process (the server's engine
    drives it step by step and collects telemetry by calling a function in the worker, which vLLM will not
    serialize to a child process; --vllm.engine-core process is the out-of-process engine), whatever an
    earlier process-core engine of this process set; the CPU KV cache size unless the user set it."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))


def prepare_vllm_engine_process(cpu_kv_cache_gib: int) -> None:
    """Before the server's vLLM engine starts with its engine core in a child process (vLLM's AsyncLLM,
    sevi/engines/vllm/vllm_process.py): vLLM's own default, whatever an earlier in-process engine of this
    process set; the CPU KV cache size unless the user set it."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))


def bind_vllm_cpu_threads(cores: list[int]) -> None:
    """vLLM's CPU worker threads on these cores (VLLM_CPU_OMP_THREADS_BIND): a batch job's Ray actor binds its
    engine to the cores it claimed, so two actors on one machine do not share cores."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))


def vllm_engine_core_in_process() -> bool:
    """Whether vLLM runs its engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
