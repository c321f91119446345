"""The vLLM engine serving in bfloat16 (`--dtype bfloat16`, how a 7B model fits a CPU machine's memory):
SEVI reads the bfloat16 paged cache with the C kernel, and that gives the tokens the torch path gives
(that layers agree to rounding, in bfloat16 too, is tested on one layer in tests/sevi/engines/vllm/plugin/).

The reference engine is not the yardstick here: its bfloat16 matmuls round differently from vLLM's, so
greedy tokens may part. Both of SEVI's K/V paths inside vLLM widen the same cached bfloat16 values to
float32, so they must agree.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from sevi.engines.reference.generation import ReferenceModel  # noqa: E402
from sevi.engines.vllm.options import VllmOptions  # noqa: E402
from sevi.engines.vllm.vllm_engine import VllmEngine  # noqa: E402
from tests.support.engines import mixed_batch, run_engine, start_engine  # noqa: E402
from tests.support.images import random_image  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Callable[[str], Path]) -> Iterator[VllmEngine]:
    eng = VllmEngine(
        str(tiny_model_dir("llava")),
        model_name="tiny-bf16",
        max_batch_size=16,
        dtype="bfloat16",
        options=VllmOptions(enforce_eager=True, distributed_executor_backend="uni"),  # the test spies in this process
    )
    start_engine(eng)
    yield eng
    asyncio.run(eng.stop())


def test_bfloat16_cache_is_read_by_the_kernel_and_equals_the_torch_path(
    engine: VllmEngine,
    tiny_model: Callable[[str], ReferenceModel],
    tiny_model_dir: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sevi.engines.vllm.plugin.paged_read as paged_read

    dtypes: list[torch.dtype] = []
    kernel_used: list[bool] = []
    pick = paged_read.c_kernel_for

    def spy(cache: paged_read.PagedKV) -> object:
        found = pick(cache)
        dtypes.append(cache.key.dtype)
        kernel_used.append(found is not None)
        return found

    monkeypatch.setattr(paged_read, "c_kernel_for", spy)
    reqs = [
        r
        for r in mixed_batch(tiny_model("llava").num_layers, [random_image(s) for s in range(2)])
        if "+cd" not in r.request_id
    ]  # contrast rows are tested in float32; here the K/V reads
    with_kernel = run_engine(engine, reqs)
    assert dtypes and set(dtypes) == {torch.bfloat16} and all(kernel_used)

    monkeypatch.setattr(paged_read, "kernel", lambda: None)  # the torch gather + bmm path
    kernel_used.clear()
    with_torch = run_engine(engine, reqs)
    assert kernel_used and not any(kernel_used)

    # The two paths sum q.K and p.V in different orders (float32 ulps), and the layer's output is rounded to
    # bfloat16: a last-bit difference there is 0.4%, enough to move a head across a group boundary a few
    # layers on. So: the same tokens and the same aligned (row, layer)s; of those, at most 5% (at least
    # one) decided differently, which is what the head-group counts allow.
    heads = int(json.loads((tiny_model_dir("llava") / "config.json").read_text())["text_config"]["num_attention_heads"])
    for r in reqs:
        got, want = with_kernel[r.request_id][1], with_torch[r.request_id][1]
        assert with_kernel[r.request_id][0] == with_torch[r.request_id][0], r.request_id
        assert got.aligned_rows == want.aligned_rows, r.request_id
        flips = max(1, round(0.05 * want.aligned_rows))
        assert abs(got.stage1_rows - want.stage1_rows) <= flips, r.request_id
        assert abs(got.stage2_rows - want.stage2_rows) <= flips, r.request_id
        assert abs(got.heads_reweighted - want.heads_reweighted) <= flips * heads, r.request_id
    # Not vacuous: the alignment ran and changed what was generated.
    for i in range(2):
        assert with_kernel[f"explicit/{i}"][1].stage1_rows > 0 and with_kernel[f"explicit/{i}"][1].stage2_rows > 0
    assert any(with_kernel[f"explicit/{i}"][0] != with_kernel[f"c0/{i}"][0] for i in range(2))
