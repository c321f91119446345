"""Contrastive pairs in the logits processor: lockstep, dissolution (sevi/engines/vllm/plugin/logits_processor.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from sevi.engines.vllm.plugin.logits_processor import SeviLogitsProcessor  # noqa: E402
from sevi.engines.vllm.plugin.params import to_extra_args  # noqa: E402
from sevi.engines.vllm.plugin.state import STATE  # noqa: E402
from sevi.method.contrastive import contrast_logits  # noqa: E402
from sevi.method.knob import resolve_alignment  # noqa: E402
from tests.support.vllm_plugin import PLUGIN_EOS, PLUGIN_IMAGE, add_rows, processor  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_state")


def _pair_batch(proc: SeviLogitsProcessor) -> tuple[list[int], list[int]]:
    params = resolve_alignment(None, 4, omega=2.0, start_layer=1, contrast=True)
    main_out: list[int] = [9]
    contrast_out: list[int] = [9]
    add_rows(
        proc,
        [
            (0, to_extra_args(params, role="main", pair="p"), [1, PLUGIN_IMAGE, 7], main_out),
            (1, to_extra_args(params, role="contrast", pair="p"), [1, PLUGIN_IMAGE, PLUGIN_IMAGE, 7], contrast_out),
            (2, None, [1, 7], [3]),
        ],
        3,
    )
    return main_out, contrast_out


def test_pair_in_lockstep_combines_and_forces_the_same_token_on_both_rows() -> None:
    proc = processor()
    _pair_batch(proc)
    STATE.observe_seq_lens(torch.tensor([4, 5, 3]))  # both rows sample their output index 1
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    want = int(contrast_logits(logits[:1], logits[1:2]).argmax())
    third = logits[2].clone()
    out = proc.apply(logits.clone())
    assert int(out[0].argmax()) == want and int(out[1].argmax()) == want
    assert torch.isinf(out[:2]).sum() == 2 * 49  # one-hot: vLLM's sampler can pick nothing else
    assert torch.equal(out[2], third)  # rows outside pairs are untouched


def test_pair_out_of_lockstep_is_dissolved_main_goes_on_alone_contrast_ends() -> None:
    proc = processor()
    main_out, _ = _pair_batch(proc)
    STATE.observe_seq_lens(torch.tensor([4, 3, 3]))  # the contrast row is mid-prefill (e.g. resumed)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    out = proc.apply(logits.clone())
    assert torch.equal(out[0], logits[0])  # the main row keeps its own (aligned) logits
    assert int(out[1].argmax()) == PLUGIN_EOS and torch.isinf(out[1]).sum() == 49
    assert "p" in STATE.dissolved_pairs
    # Later steps stay dissolved even when the rows line up again.
    main_out.append(4)
    proc.update_state(None)
    STATE.observe_seq_lens(torch.tensor([5, 5, 3]))
    out = proc.apply(logits.clone())
    assert torch.equal(out[0], logits[0]) and int(out[1].argmax()) == PLUGIN_EOS
    # The mark lives as long as a row of the pair does (a long-running server must not keep them all).
    STATE.remove(1)
    assert "p" in STATE.dissolved_pairs
    STATE.remove(0)
    assert "p" not in STATE.dissolved_pairs


def test_pair_with_partner_missing_is_dissolved_and_neither_sampling_waits() -> None:
    proc = processor()
    params = resolve_alignment(None, 4, omega=2.0, start_layer=1, contrast=True)
    add_rows(proc, [(0, to_extra_args(params, role="main", pair="q"), [1, PLUGIN_IMAGE, 7], [])], 1)
    STATE.observe_seq_lens(torch.tensor([2]))  # partial prefill: nothing to decide yet
    logits = torch.randn(1, 20)
    assert torch.equal(proc.apply(logits.clone()), logits) and "q" not in STATE.dissolved_pairs
    proc.update_state(None)
    STATE.observe_seq_lens(torch.tensor([3]))  # samples, but its contrast row is not in the batch
    assert torch.equal(proc.apply(logits.clone()), logits) and "q" in STATE.dissolved_pairs
