"""What can be checked of the GPU backend without a GPU: the guards vLLM applies at start-up.

The backend recomputes aligned rows eagerly every step, so vLLM must never capture full CUDA graphs with it
(a replay would run the stock kernel and skip SEVI), and it reads K/V as stored, so an fp8 cache is refused.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import CompilationConfig  # noqa: E402
from vllm.config.compilation import CompilationMode, CUDAGraphMode  # noqa: E402
from vllm.v1.attention.backend import AttentionCGSupport  # noqa: E402

from sevi.engines.vllm.plugin import paged_read  # noqa: E402
from sevi.engines.vllm.plugin.gpu_backend import SeviFlashAttentionBackend, SeviFlashAttentionImpl  # noqa: E402


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
            names = (
                "num_heads",
                "head_size",
                "scale",
                "num_kv_heads",
                "alibi_slopes",
                "sliding_window",
                "kv_cache_dtype",
            )
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
def test_a_gpu_defaults_to_the_triton_kernels_where_triton_imports(
    monkeypatch: pytest.MonkeyPatch, importable: bool, want: str
) -> None:
    import sevi.kernels as kernels
    from sevi.kernels import choice

    monkeypatch.delenv("SEVI_ALIGNED_KERNEL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "triton_available", lambda: None if importable else "triton is not installed")
    choice.aligned_kernel.cache_clear()
    try:
        assert choice.aligned_kernel() == want
    finally:
        choice.aligned_kernel.cache_clear()


def _flash_reference(query: torch.Tensor, kv_cache: torch.Tensor, md: Any, output: torch.Tensor, scale: float) -> None:
    """What FlashAttention's varlen kernel computes on the paged cache: causal attention of each sequence's
    query rows over its first `seq_lens` keys (`seqused_k`), zeros for a sequence given none."""
    qsl, seq_lens = md.query_start_loc.tolist(), md.seq_lens.tolist()
    hd = kv_cache.shape[-1] // 2
    bs = kv_cache.shape[2]
    rep = query.shape[1] // kv_cache.shape[1]
    for b, n_keys in enumerate(seq_lens):
        first, end = qsl[b], qsl[b + 1]
        if n_keys == 0:
            output[first:end] = 0
            continue
        blocks = md.block_table[b, : -(-n_keys // bs)].long()
        kv = kv_cache[blocks].permute(1, 0, 2, 3).reshape(kv_cache.shape[1], -1, 2 * hd)[:, :n_keys].float()
        k, v = kv[..., :hd].repeat_interleave(rep, 0), kv[..., hd:].repeat_interleave(rep, 0)
        q = query[first:end].float().transpose(0, 1)  # [H, q, D]
        scores = q @ k.transpose(1, 2) * scale
        pos = torch.arange(n_keys - (end - first), n_keys)
        scores = scores.masked_fill(torch.arange(n_keys)[None, None, :] > pos[None, :, None], float("-inf"))
        out = torch.softmax(scores, -1) @ v  # [H, q, D]
        output[first:end] = out.transpose(0, 1).reshape(end - first, -1).to(output.dtype)


def test_mixed_steps_give_flash_attention_no_keys_for_wholly_aligned_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed step (an aligned decode row, an unaligned one, a prompt whose last row is aligned, a decode row
    whose start layer comes later), with FlashAttention replaced by a reference of its varlen contract: per
    layer it is given zero keys exactly for the sequences whose whole query is aligned there, and the layer's
    output equals FlashAttention on every row with the aligned rows written over it (the path before)."""
    from types import SimpleNamespace

    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl, FlashAttentionMetadata

    from sevi.engines.vllm.plugin.gpu_backend import SeviFlashAttentionMetadata, unaligned_metadata, with_step
    from sevi.engines.vllm.plugin.params import to_extra_args
    from sevi.engines.vllm.plugin.state import STATE
    from sevi.engines.vllm.plugin.step import StepBuilder
    from sevi.kernels import choice
    from sevi.method.knob import resolve_alignment
    from tests.support.vllm_plugin import PLUGIN_IMAGE, add_rows, processor

    # The kernel choice is read once per process: cleared here and after, so neither this test nor the ones
    # after it run with another test's choice.
    monkeypatch.setenv("SEVI_ALIGNED_KERNEL", "torch")
    choice.aligned_kernel.cache_clear()
    seen: list[Any] = []

    def flash(
        self: Any,
        layer: Any,
        query: torch.Tensor,
        key: Any,
        value: Any,
        kv_cache: torch.Tensor,
        md: Any,
        output: torch.Tensor,
        *args: Any,
    ) -> torch.Tensor:
        seen.append(md)
        _flash_reference(query, kv_cache, md, output, self.scale)
        return output

    monkeypatch.setattr(FlashAttentionImpl, "forward", flash)
    STATE.reset()
    try:
        proc = processor()
        early = to_extra_args(resolve_alignment(None, 4, start_layer=1, omega=2.0, kappa=0.5))
        late = to_extra_args(resolve_alignment(None, 4, start_layer=3, omega=2.0, kappa=0.5))
        prompt = [1] + [PLUGIN_IMAGE] * 8 + [7, 8, 9]
        add_rows(
            proc,
            [
                (0, early, prompt, [11] * 30),
                (1, None, prompt, [4] * 20),
                (2, early, prompt, []),
                (3, late, prompt, [11] * 25),
            ],
            4,
        )
        q_len = torch.tensor([1, 1, 12, 1], dtype=torch.int32)
        seq = torch.tensor([42, 32, 12, 37], dtype=torch.int32)
        qsl = torch.cat([torch.zeros(1, dtype=torch.int32), q_len.cumsum(0).int()])
        heads, kv_heads, hd, bs = 4, 2, 32, 16
        gen = torch.Generator().manual_seed(0)
        kv_cache = torch.randn(16, kv_heads, bs, 2 * hd, generator=gen)
        table = torch.randperm(16, generator=gen)[:12].view(4, 3).int()
        n_tokens = int(qsl[-1])
        flash_md = FlashAttentionMetadata(
            num_actual_tokens=n_tokens,
            max_query_len=12,
            query_start_loc=qsl,
            max_seq_len=42,
            seq_lens=seq,
            block_table=table,
            slot_mapping=torch.arange(n_tokens),
            scheduler_metadata=torch.zeros(4),
        )
        # What the metadata builder's build() does after FlashAttention's: the step's SEVI part, from vLLM's host
        # copies of the row counts (here the tensors are the host's already).
        common = SimpleNamespace(query_start_loc_cpu=qsl.long(), seq_lens_cpu_upper_bound=seq)
        builder = StepBuilder()

        def build() -> Any:
            md = with_step(flash_md, builder, common, bs, torch.device("cpu"))
            assert isinstance(md, SeviFlashAttentionMetadata) and md.sevi is not None and md.sevi.plan is not None
            return md

        md = build()
        # Sharp heads (core) and flat ones (global), so both stages of the alignment act.
        query = torch.randn(n_tokens, heads, hd, generator=gen) * torch.tensor([4.0, 4.0, 0.25, 0.25])[:, None]
        plain = torch.empty(n_tokens, heads * hd)
        _flash_reference(query, kv_cache, md, plain, hd**-0.5)

        impl = SeviFlashAttentionImpl(heads, hd, hd**-0.5, kv_heads, None, None, "auto")
        for layer_number, zeroed in ((1, [0]), (3, [0, 3])):
            layer = SimpleNamespace(layer_name=f"language_model.model.layers.{layer_number}.self_attn.attn")
            impl._layer_known = False
            STATE.begin_step(False)
            md = build()
            seen.clear()
            out = impl.forward(layer, query, None, None, kv_cache, md, torch.empty(n_tokens, heads * hd))
            assert len(seen) == 1 and seen[0].scheduler_metadata is None
            assert seen[0].seq_lens.tolist() == [0 if b in zeroed else int(seq[b]) for b in range(4)]
            # The path before: FlashAttention on every row, the aligned rows written over it.
            impl._plain = False
            STATE.begin_step(False)
            md = build()
            before = impl.forward(layer, query, None, None, kv_cache, md, torch.empty(n_tokens, heads * hd))
            impl._plain = True
            assert torch.equal(out, before)
            aligned_rows = {0, 13} | ({14} if layer_number == 3 else set())  # decode rows; row 13: prompt's last
            changed = set(torch.nonzero((out - plain).abs().amax(-1) > 1e-4).squeeze(1).tolist())
            assert 0 in changed and changed <= aligned_rows  # alignment moved aligned rows only

        # Built on the device's metadata alone: nothing is read back to the host (a wait for the GPU).
        with monkeypatch.context() as m:
            for name in ("cpu", "tolist", "item", "numpy", "__bool__", "__int__"):

                def refuse(*args: object, _name: str = name, **kwargs: object) -> None:
                    raise AssertionError(f"read a tensor back ({_name})")

                m.setattr(torch.Tensor, name, refuse)
            subset = unaligned_metadata(md, torch.tensor([0, 2, 3]))
        assert subset.seq_lens.tolist() == [0, 32, 12, 0]
    finally:
        STATE.reset()
        choice.aligned_kernel.cache_clear()


def test_the_triton_kernels_are_compiled_while_the_engine_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer shape's kernels are compiled once, when vLLM builds the layers, for the engine's cache dtype and
    block size: not inside the first decode steps (with num_keys not specialised, no later step compiles)."""
    from sevi.engines.vllm.plugin import gpu_backend
    from sevi.kernels import sevi_decode

    warmed: list[tuple[Any, ...]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(gpu_backend, "aligned_kernel", lambda: "triton")
    monkeypatch.setattr(gpu_backend, "_engine_cache", lambda: (torch.bfloat16, 16))
    monkeypatch.setattr(sevi_decode, "warm_up", lambda *args: warmed.append(args))
    gpu_backend._warm.cache_clear()
    for _ in range(3):  # three layers of one shape
        SeviFlashAttentionImpl(28, 128, 0.125, 4, None, None, "auto")
    SeviFlashAttentionImpl(32, 128, 0.125, 32, None, None, "auto")
    assert warmed == [
        (28, 4, 128, torch.bfloat16, 16, torch.device("cuda", 0)),
        (32, 32, 128, torch.bfloat16, 16, torch.device("cuda", 0)),
    ]
    monkeypatch.setattr(gpu_backend, "aligned_kernel", lambda: "torch")
    SeviFlashAttentionImpl(16, 128, 0.125, 4, None, None, "auto")
    assert len(warmed) == 2  # the torch escape hatch compiles nothing
    gpu_backend._warm.cache_clear()
