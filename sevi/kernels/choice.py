"""Which kernel computes SEVI's aligned rows in the vLLM backends: the one place `SEVI_ALIGNED_KERNEL` is interpreted
(`--kernels.aligned-kernel` in the server, which exports it: sevi/runtime/runtime_env.py).

- `c`: the C kernel (sevi/kernels/paged_kv.py) for q.K and softmax + p.V around the compiled torch
  operator; the CPU default where that kernel builds.
- `triton`: the Triton kernels of :mod:`sevi.kernels.sevi_decode`; the GPU default where triton imports (not
  yet run on a GPU); on CPU through Triton's interpreter (slow, for tests).
- `torch`: gather + bmm and the torch operator (sevi/engines/vllm/plugin/paged_read.py); the default elsewhere, and the
  escape hatch on a GPU.
"""

from __future__ import annotations

import functools

import torch

from sevi.runtime import runtime_env

KERNELS = runtime_env.ALIGNED_KERNELS


@functools.lru_cache(maxsize=1)
def aligned_kernel() -> str:
    """The kernel named by SEVI_ALIGNED_KERNEL, else the default for this machine (read once per process)."""
    chosen = runtime_env.current().aligned_kernel
    if chosen:
        if chosen not in KERNELS:
            raise ValueError(f"SEVI_ALIGNED_KERNEL={chosen!r}: expected one of {', '.join(KERNELS)}")
        if chosen == "triton":
            from sevi.kernels import triton_available

            why = triton_available()
            if why is not None:
                raise RuntimeError(f"SEVI_ALIGNED_KERNEL=triton but {why}")
        return chosen
    if torch.cuda.is_available():  # the GPU backend's aligned rows: the Triton kernels where triton imports
        from sevi.kernels import triton_available

        return "triton" if triton_available() is None else "torch"
    from sevi.kernels.paged_kv import kernel  # built (or loaded) here only when asked: a GPU never builds it

    return "c" if kernel() is not None else "torch"
