"""What can be checked of the GPU backend without a GPU: the guards vLLM applies at start-up.

The backend recomputes aligned rows eagerly every step, so vLLM must never capture full CUDA graphs with it
(a replay would run the stock kernel and skip SEVI), and it reads K/V as stored, so an fp8 cache is refused.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import CompilationConfig  # noqa: E402
from vllm.config.compilation import CompilationMode, CUDAGraphMode  # noqa: E402
from vllm.v1.attention.backend import AttentionCGSupport  # noqa: E402

from models.vllm_plugin import paged_read  # noqa: E402
from models.vllm_plugin.gpu_backend import SeviFlashAttentionBackend, SeviFlashAttentionImpl  # noqa: E402


def test_no_full_cuda_graphs_whatever_the_server_asks() -> None:
    builder = SeviFlashAttentionBackend.get_builder_cls()
    support = builder.get_cudagraph_support(None, None)  # type: ignore[arg-type]
    assert support == AttentionCGSupport.NEVER
    # vLLM's GPU default (FULL_AND_PIECEWISE) loses its full graphs; an explicit FULL is refused.
    default = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    resolved = default.resolve_cudagraph_mode_and_sizes(support, "FLASH_ATTN")
    assert resolved.decode_mode() != CUDAGraphMode.FULL and resolved.mixed_mode() != CUDAGraphMode.FULL
    full = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL)
    with pytest.raises(ValueError, match="not supported"):
        full.resolve_cudagraph_mode_and_sizes(support, "FLASH_ATTN")


@pytest.mark.parametrize("positional", [False, True])
def test_fp8_cache_is_refused_with_a_clear_error(positional: bool) -> None:
    args = (4, 64, 0.125, 4, None, None, "fp8_e4m3")
    with pytest.raises(ValueError, match="fp8 cache"):
        if positional:
            SeviFlashAttentionImpl(*args)
        else:
            names = ("num_heads", "head_size", "scale", "num_kv_heads", "alibi_slopes", "sliding_window",
                     "kv_cache_dtype")
            SeviFlashAttentionImpl(**dict(zip(names, args, strict=True)))


def test_a_gpu_cache_never_builds_the_cpu_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def build() -> None:
        raise AssertionError("the CPU kernel was built for a cache outside CPU memory")

    monkeypatch.setattr(paged_read, "kernel", build)
    meta = torch.empty(4, 2, 16, 32, device="meta")
    assert paged_read.c_kernel_for(paged_read.PagedKV(meta, meta, False, False)) is None


@pytest.mark.parametrize(("window", "plain"), [(None, True), (4096, False)])
def test_layer_facts_found_at_the_first_forward(window: int | None, plain: bool) -> None:
    """The layer number and whether the recomputation reproduces the layer's attention (no sliding window,
    ALiBi, soft cap or sinks): only then may FlashAttention be skipped when every row is aligned."""
    from types import SimpleNamespace

    impl = SeviFlashAttentionImpl(4, 64, 0.125, 4, None, window, "auto")
    impl._know(SimpleNamespace(layer_name="language_model.model.layers.3.self_attn.attn"))
    assert impl._layer == 3 and impl._plain is plain


@pytest.mark.parametrize(("importable", "want"), [(True, "triton"), (False, "torch")])
def test_a_gpu_defaults_to_the_triton_kernels_where_triton_imports(monkeypatch: pytest.MonkeyPatch,
                                                                  importable: bool, want: str) -> None:
    import models.kernels as kernels
    from models.kernels import choice

    monkeypatch.delenv("SEVI_ALIGNED_KERNEL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "triton_available", lambda: None if importable else "triton is not installed")
    choice.aligned_kernel.cache_clear()
    try:
        assert choice.aligned_kernel() == want
    finally:
        choice.aligned_kernel.cache_clear()
