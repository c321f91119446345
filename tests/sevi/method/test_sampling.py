"""The shared token choice (`sevi.method.sampling`): OpenAI's penalties, equal to vLLM's to the bit, and the reference
engine choosing its greedy tokens from penalised logits."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch

from sevi.engines.api import GenerationRequest, SamplingParams, user_message
from sevi.engines.reference.generation import ReferenceModel
from sevi.method.knob import resolve_alignment
from sevi.method.sampling import apply_penalties, block_tokens, sample_token
from tests.support.images import random_image


def _by_definition(logits: torch.Tensor, ids: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's formula, token by token in float64."""
    out = logits.double().clone()
    for token, count in Counter(ids).items():
        out[token] -= frequency * count + presence
    return out


@pytest.mark.parametrize(("presence", "frequency"), [(0.0, 0.7), (1.3, 0.0), (-0.4, 1.9), (2.0, -2.0)])
def test_penalties_follow_openais_definition(presence: float, frequency: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=gen) * 5
    ids = [3, 7, 3, 49, 3, 0, 7]
    got = apply_penalties(logits.clone(), ids, presence, frequency)
    torch.testing.assert_close(got.double(), _by_definition(logits, ids, presence, frequency), rtol=0, atol=1e-5)
    untouched = [t for t in range(50) if t not in ids]
    assert torch.equal(got[untouched], logits[untouched])


def test_no_penalty_or_no_output_leaves_the_logits_alone() -> None:
    logits = torch.randn(10)
    assert torch.equal(apply_penalties(logits.clone(), [1, 2], 0.0, 0.0), logits)
    assert torch.equal(apply_penalties(logits.clone(), [], 1.0, 1.0), logits)


def test_penalties_equal_vllms_to_the_bit() -> None:
    """vLLM's sampler applies the non-contrasted rows' penalties, `sevi.method.sampling` the contrasted ones and all of
    the reference engine's: the same float32 logits, so greedy choices cannot part on a near tie."""
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.utils import apply_penalties as vllm_apply_penalties

    gen = torch.Generator().manual_seed(1)
    vocab = 1000
    logits = torch.randn(3, vocab, generator=gen) * 7
    outputs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (1, 40, 300)]
    presence = torch.tensor([0.3, -1.1, 1.7])
    frequency = torch.tensor([1.9, 0.45, -0.8])
    pad = vocab  # vLLM pads its token tensors with the vocabulary size
    width = max(len(o) for o in outputs)
    out_t = torch.tensor([o + [pad] * (width - len(o)) for o in outputs])
    prompt_t = torch.full((3, 1), pad)
    want = vllm_apply_penalties(logits.clone(), prompt_t, out_t, presence, frequency, torch.ones(3))
    for i, ids in enumerate(outputs):
        got = apply_penalties(logits[i].clone(), ids, float(presence[i]), float(frequency[i]))
        assert torch.equal(got, want[i]), i


def test_repetition_penalty_equals_vllms_to_the_bit() -> None:
    """vLLM's repetition penalty (over prompt and output tokens) then frequency and presence, as vLLM applies them."""
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.utils import apply_penalties as vllm_apply_penalties

    gen = torch.Generator().manual_seed(4)
    vocab = 500
    logits = torch.randn(2, vocab, generator=gen) * 5
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (30, 7)]
    outputs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (12, 50)]
    repetition = torch.tensor([1.7, 0.6])
    presence, frequency = torch.tensor([0.5, 0.0]), torch.tensor([0.0, 1.2])

    def padded(rows: list[list[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [vocab] * (width - len(r)) for r in rows])

    want = vllm_apply_penalties(logits.clone(), padded(prompts), padded(outputs), presence, frequency, repetition)
    for i in range(2):
        got = apply_penalties(
            logits[i].clone(), outputs[i], float(presence[i]), float(frequency[i]), float(repetition[i]), prompts[i]
        )
        assert torch.equal(got, want[i]), i
    assert not torch.equal(want[0], logits[0])  # not vacuous


def test_top_k_min_p_and_min_tokens_restrict_the_draw() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(3))
    top2 = set(logits.topk(2).indices.tolist())
    draws = {sample_token(logits, 5.0, 1.0, torch.Generator().manual_seed(s), top_k=2) for s in range(40)}
    assert draws == top2  # both kept tokens drawn, nothing else
    probs = torch.softmax(logits / 5.0, -1)
    kept = set(torch.nonzero(probs >= 0.9 * probs.max()).flatten().tolist())
    draws = {sample_token(logits, 5.0, 1.0, torch.Generator().manual_seed(s), min_p=0.9) for s in range(40)}
    assert draws <= kept and len(kept) < 100
    blocked = block_tokens(logits.clone(), [int(logits.argmax()), 1000])  # an id past the vocabulary is ignored
    assert int(blocked.argmax()) != int(logits.argmax()) and torch.isinf(blocked).sum() == 1


def test_sample_token_is_seeded_and_keeps_the_top_token_under_a_tiny_top_p() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(2))
    draws = [sample_token(logits, 1.0, 0.9, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert draws[0] == draws[1]
    assert sample_token(logits, 1.0, 1e-6, torch.Generator().manual_seed(5)) == int(logits.argmax())


def test_reference_engine_chooses_greedy_tokens_from_penalised_logits(
    tiny_model: Callable[[str], ReferenceModel],
) -> None:
    """Step by step, the raw logits the batch computed, penalised by OpenAI's formula over the tokens generated
    before, have the token the engine chose as their argmax."""
    model = tiny_model("llava")
    presence, frequency = 1.0, 2.0
    request = GenerationRequest(
        "p",
        user_message("describe"),
        [random_image(20)],
        resolve_alignment(0, 4),
        SamplingParams(max_tokens=30, presence_penalty=presence, frequency_penalty=frequency, ignore_eos=True),
    )
    batch = model.start([request])
    chosen: list[int] = []
    moved = 0
    while not batch.done:
        (event,) = batch.step()
        assert batch.last_logits is not None and event.token_id is not None
        raw = batch.last_logits[0]
        assert int(_by_definition(raw, chosen, presence, frequency).argmax()) == event.token_id
        moved += int(raw.argmax()) != event.token_id
        chosen.append(event.token_id)
    assert moved > 0  # not vacuous: the penalties changed some choices
