"""The vLLM plugin's unit tests (tests/sevi/engines/vllm/plugin): a logits processor on a small LLaVA config and rows
added to it, which fills the worker state (sevi/engines/vllm/plugin/state.py) as vLLM's batch updates would; CPU paged
caches written by vLLM's own writer; the C kernel's two builds. vLLM is imported only when these are called."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from sevi.engines.vllm.plugin.logits_processor import SeviLogitsProcessor

PLUGIN_IMAGE = 5
PLUGIN_EOS = 2


def processor(layers: int = 4, model_dir: Path | None = None) -> SeviLogitsProcessor:
    """The logits processor as vLLM's worker builds it; `model_dir` is the served folder (its presets file)."""
    from types import SimpleNamespace

    import torch
    from transformers import LlavaConfig

    from sevi.engines.vllm.plugin.logits_processor import SeviLogitsProcessor

    cfg = LlavaConfig(image_token_index=PLUGIN_IMAGE)
    text: Any = cfg.text_config  # a config object once built (typed as a union with its dict form)
    text.num_hidden_layers = layers
    text.eos_token_id = PLUGIN_EOS
    return SeviLogitsProcessor(
        SimpleNamespace(  # type: ignore[arg-type]
            model_config=SimpleNamespace(hf_config=cfg, model=str(model_dir or "tiny-llava/not-a-folder"))
        ),
        torch.device("cpu"),
        False,
    )


def add_rows(
    proc: SeviLogitsProcessor, rows: list[tuple[int, dict[str, object] | None, list[int], list[int]]], size: int
) -> None:
    """Rows (batch index, SEVI extra args or None, prompt ids, output ids so far) joining a batch of `size`."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    added = [(i, VllmSamplingParams(temperature=0.0, extra_args=extra), prompt, out) for i, extra, prompt, out in rows]
    proc.update_state(BatchUpdate(batch_size=size, removed=[], added=added, moved=[]))


def random_cpu_cache(
    n_blocks: int, heads: int, bs: int, hd: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, bool, bool]:
    """A CPU cache filled through the kernel's own writer (every slot), and its probed K/V layout."""
    from vllm import _custom_ops as ops

    from sevi.engines.vllm.plugin.cpu_backend import cache_layout

    gen = torch.Generator().manual_seed(seed)
    cache = torch.zeros(n_blocks, heads, bs, 2 * hd, dtype=dtype)
    kc, vc = cache.view(n_blocks, heads, 2 * bs, hd).chunk(2, dim=2)
    n = n_blocks * bs
    k, v = torch.randn(n, heads, hd, generator=gen).to(dtype), torch.randn(n, heads, hd, generator=gen).to(dtype)
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, torch.arange(n, dtype=torch.long), "vec")
    layout = cache_layout("vec", dtype, bs, hd)
    assert layout is not None, "the kernel's writer wrote neither layout"
    return cache, *layout


@functools.lru_cache(maxsize=1)
def avx2_kernel() -> Any:
    from sevi.kernels.paged_kv import flags_for, load

    flags = flags_for("AVX2")
    assert flags is not None
    return load(flags)


def use_kernel(build: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make paged_read.py read K/V with the C kernel as built for this CPU ("native") or for AVX2 ("avx2": its own
    tile width, 8 floats, not AVX-512's 16; where the CPU has AVX2)."""
    import sevi.engines.vllm.plugin.paged_read as paged_read

    if build == "avx2":
        if not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
            pytest.skip("this CPU has no AVX2")
        assert avx2_kernel() is not None, "the AVX2 kernel did not build here"
        monkeypatch.setattr(paged_read, "kernel", avx2_kernel)
    else:
        assert paged_read.kernel() is not None, "the C kernel did not build here"
