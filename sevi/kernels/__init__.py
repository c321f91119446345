"""GPU kernels of SEVI (Triton), importable without vLLM (``make gpu-check`` runs them on a bare GPU machine).

:mod:`sevi.kernels.sevi_decode` is the aligned decode attention over vLLM's paged cache. Importing it
needs triton; :func:`triton_available` says whether that works here (and why not) without raising.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from sevi.runtime import runtime_env


def use_interpreter() -> bool:
    """Whether Triton kernels must run in its interpreter (no CUDA device): set TRITON_INTERPRET before the
    kernels are defined, since triton reads it when @triton.jit decorates them. TRITON_INTERPRET=0, set
    explicitly, keeps GPU kernels without a device (to compile them: bench/kernel_compile.py)."""
    if runtime_env.triton_compile_only():
        return False
    if not torch.cuda.is_available() and not runtime_env.triton_interpreting():
        if "triton" in sys.modules:  # its own library's kernels were decorated for a GPU: the interpreter fails
            raise RuntimeError(
                "no CUDA device and triton was imported without TRITON_INTERPRET=1: set it in the "
                "environment before starting (the Triton kernels then run in its interpreter)"
            )
        runtime_env.use_triton_interpreter()
    return runtime_env.triton_interpreting()


def triton_available() -> str | None:
    """None where triton can be imported, else the reason it cannot."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (make install puts triton==3.7.1 in the venv)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install must not take the server down: it reports why instead
        return f"triton does not import: {exc}"
    return None
