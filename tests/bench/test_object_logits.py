"""bench/object_logits.py: teacher-forced log-probabilities of object words under SEVI settings."""

from __future__ import annotations

import pytest
import torch

from bench.object_logits import forced_logprobs, measure, mentions, parse_settings
from sevi.engines.api import GenerationRequest, SamplingParams, user_message
from sevi.engines.reference.generation import ReferenceModel, run_to_completion
from sevi.families import DEFAULT_PROMPT
from sevi.method.knob import resolve_alignment
from tests.support.repo import BUNDLED
from training import scenes


@pytest.fixture(scope="module")
def bundled() -> ReferenceModel:
    return ReferenceModel.load(str(BUNDLED))


def test_mentions_sit_at_the_word_that_decides_them(bundled: ReferenceModel) -> None:
    ids = bundled.tokenizer(" a cup and a traffic light next to two dogs", add_special_tokens=False)["input_ids"]
    found = mentions(bundled, ids, {"cup", "dog"})
    assert [(m.position, m.category, m.present) for m in found] == [
        (1, "cup", True),
        (4, "traffic light", False),  # decided at "traffic", not at "light"
        (9, "dog", True),
    ]


def test_replaying_the_greedy_caption_reproduces_it_and_settings_differ(bundled: ReferenceModel) -> None:
    scene = scenes.make_scene("counter-prior", 0)
    off = resolve_alignment(0, bundled.num_layers)
    request = GenerationRequest("r", user_message(DEFAULT_PROMPT), [scene.image], off, SamplingParams(max_tokens=24))
    caption = run_to_completion(bundled, [request])["r"].token_ids
    strong = resolve_alignment(None, bundled.num_layers, omega=20.0, start_layer=0, kappa=0.9, contrast=False)
    logp = forced_logprobs(bundled, scene.image, DEFAULT_PROMPT, caption, [off, strong])
    assert logp.shape[:2] == (2, len(caption))
    # The unmodified row, fed its own greedy caption, picks that caption at every step.
    assert logp[0].argmax(-1).tolist() == caption
    assert torch.allclose(logp[0].exp().sum(-1), torch.ones(len(caption)), atol=1e-4)
    # A strong setting changes the distribution (not vacuous) while it reads the same prefix.
    assert (logp[1] - logp[0]).abs().max() > 1e-2


def test_an_omega_zero_setting_moves_nothing(bundled: ReferenceModel) -> None:
    settings = parse_settings("0:0:0.9,20:0:0.9", bundled.num_layers)
    shifts, counts = measure(bundled, settings, "counter-prior", limit=4, max_tokens=24)
    assert counts["present"] + counts["absent"] > 0
    zero, strong = shifts
    # Equal to c = 0 within float noise (the rows share a batch with aligned ones).
    assert zero.params.omega == 0.0 and max(abs(d) for d in zero.present + zero.absent) < 1e-4
    assert zero.present_moved == zero.absent_moved == 0
    assert any(abs(d) > 1e-3 for d in strong.present + strong.absent)
