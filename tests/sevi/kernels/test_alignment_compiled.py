"""The ahead-of-time compiled operator equals the eager one, and the eager one is kept where it must be."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sevi.kernels import alignment_compiled
from sevi.kernels.alignment_dispatch import align_prepared, compiled_operator
from sevi.method import alignment
from sevi.method.alignment import MASKED, align_tensors, prepare_rows


def _inputs(r: int, h: int, k: int, seed: int, on: float = 2.0) -> tuple[torch.Tensor, alignment.PreparedRows]:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(r, h, k, generator=gen) * 4
    valid = torch.rand(r, k, generator=gen) < 0.9
    valid[:, 0] = True
    semantic = torch.rand(r, k, generator=gen) < 0.3
    other = ~semantic & (torch.rand(r, k, generator=gen) < 0.7)
    kappa = torch.rand(r, generator=gen)
    return scores, prepare_rows(valid, semantic, other, torch.full((r,), on), kappa)


@pytest.fixture(scope="module")
def compiled() -> alignment_compiled.CompiledOperator:
    op = compiled_operator()
    assert op is not None, "the operator did not compile here (no C++ compiler?)"
    return op  # type: ignore[no-any-return]


@pytest.mark.parametrize(("r", "h", "k"), [(1, 8, 50), (8, 8, 111), (3, 32, 600), (16, 4, 7), (1, 1, 2), (5, 16, 130)])
def test_compiled_equals_eager(compiled: alignment_compiled.CompiledOperator, r: int, h: int, k: int) -> None:
    scores, rows = _inputs(r, h, k, seed=r * 1000 + h * 10 + k)
    on = torch.arange(r)[:, None] % 3 != 1  # some rows with omega == 0 (when there are several)
    args = (scores, rows.key_bias, rows.semantic_keys, rows.other_keys, rows.kappa, rows.blend)
    got, want = compiled.run([*args, on]), align_tensors(*args, on=on)
    for g, w in zip(got[1:], want[1:], strict=True):  # head groups and the heads each stage moved: identical
        assert torch.equal(g, w)
    valid = rows.key_bias == 0
    torch.testing.assert_close(got[0].masked_fill(~valid, 0), want[0].masked_fill(~valid, 0), rtol=1e-5, atol=1e-5)
    assert bool((got[0].masked_fill(valid, 0) <= MASKED / 2).sum() == (~valid).sum() * h)  # masked keys stay masked
    # Not vacuous: both stages moved heads somewhere in the longer inputs.
    if k >= 100:
        assert bool(want[4].any()) and bool(want[5].any())


def test_align_prepared_takes_the_compiled_operator_for_float32_cpu_rows(
    compiled: alignment_compiled.CompiledOperator, monkeypatch: pytest.MonkeyPatch
) -> None:
    scores, rows = _inputs(4, 8, 40, seed=1)
    calls: list[int] = []
    run = compiled.run
    monkeypatch.setattr(compiled, "run", lambda args: calls.append(1) or run(args))
    align_prepared(scores, rows)
    off = prepare_rows(
        rows.key_bias[:, 0] == 0,
        rows.semantic_keys[:, 0] > 0,
        rows.other_keys[:, 0] > 0,
        torch.tensor([2.0, 0.0, 2.0, 2.0]),
        rows.kappa[:, 0],
    )
    out, groups = align_prepared(scores, off)  # a row with omega == 0: compiled too, and left unmoved
    assert calls == [1, 1] and not bool(groups.stage1[1].any()) and not bool(groups.stage2[1].any())  # type: ignore[index]
    assert torch.equal(out[1], (scores + off.key_bias)[1])
    # Eager where the compiled graph does not apply: float64 scores or knobs, non-contiguous scores or masks
    # (the compiled code would read them with the strides it was traced with).
    align_prepared(scores.double(), rows)
    align_prepared(scores.transpose(0, 1).contiguous().transpose(0, 1), rows)
    wide = prepare_rows(
        torch.ones(4, 50, dtype=torch.bool),
        torch.zeros(4, 50, dtype=torch.bool),
        torch.ones(4, 50, dtype=torch.bool),
        torch.full((4,), 2.0),
        rows.kappa[:, 0],
    )
    strided = replace(rows, other_keys=wide.other_keys[..., :40])
    assert not strided.other_keys.is_contiguous()
    align_prepared(scores, strided)
    assert calls == [1, 1]


def test_turned_off_or_unbuildable_means_eager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SEVI_COMPILED_OPERATOR", "0")
    assert alignment_compiled.load() is None
    monkeypatch.setenv("SEVI_COMPILED_OPERATOR", "1")
    monkeypatch.setenv("SEVI_KERNEL_CACHE", str(tmp_path))  # nothing cached here: a build is due

    def fail(target: Path, name: str = "operator") -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(alignment_compiled, "_build", fail)
    with caplog.at_level(logging.WARNING, logger="sevi.alignment"):
        assert alignment_compiled.load() is None
    assert "running it eagerly" in caplog.text


@pytest.mark.integration
def test_a_build_under_a_bfloat16_default_dtype_is_the_float32_operator_and_leaves_inductor_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM builds the operator while it loads a model, under `set_default_torch_dtype(model dtype)`. A bfloat16
    model once made a bfloat16 package under the float32 package's name: every later float32 caller got
    bfloat16 outputs and other head groups (fails without the float32 example and trace in _build)."""
    monkeypatch.setenv("SEVI_COMPILED_OPERATOR", "1")
    monkeypatch.setenv("SEVI_KERNEL_CACHE", str(tmp_path))  # a build is due
    default = torch.get_default_dtype()
    inductor_config = torch._inductor.config.save_config_portable()
    torch.set_default_dtype(torch.bfloat16)
    try:
        op = alignment_compiled.load()
    finally:
        torch.set_default_dtype(default)
    assert op is not None
    # The build leaves inductor's process-wide config as it was: vLLM hashes it into its compile-cache key, and a
    # build that filled `aot_inductor.metadata` made every warm restart compile the model again.
    assert torch._inductor.config.save_config_portable() == inductor_config
    scores, rows = _inputs(8, 8, 111, seed=8 * 1000 + 8 * 10 + 111)  # test_compiled_equals_eager's (8, 8, 111)
    on = torch.ones(8, 1, dtype=torch.bool)
    args = (scores, rows.key_bias, rows.semantic_keys, rows.other_keys, rows.kappa, rows.blend)
    got, want = op.run([*args, on]), align_tensors(*args, on=on)
    assert got[0].dtype == torch.float32
    for g, w in zip(got[1:], want[1:], strict=True):
        assert torch.equal(g, w)
    assert bool(want[4].any()) and bool(want[5].any())  # both stages moved heads: the comparison can fail
