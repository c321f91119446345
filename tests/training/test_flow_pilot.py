"""The pilot variants of training/flow_pilot.py: what each one changes in the training samples."""

from __future__ import annotations

import numpy as np

from training import scenes
from training.flow_pilot import SYSTEM_PROMPT, PilotBatcher, Variant, build_processor, long_caption, qa_pair, where
from training.train_bundled import ModelConfig


def test_where_names_the_third_of_the_image() -> None:
    s = scenes.IMAGE_SIZE
    assert where((0, 0, 10, 10)) == "at the top left"
    assert where((s - 10, s - 10, s, s)) == "at the bottom right"
    assert where((s // 2 - 5, s // 2 - 5, s // 2 + 5, s // 2 + 5)) == "in the middle"
    assert where((0, s // 2 - 5, 10, s // 2 + 5)) == "on the left"
    assert where((s // 2 - 5, 0, s // 2 + 5, 10)) == "at the top"


def test_long_caption_adds_one_sentence_per_category() -> None:
    scene = scenes.make_scene("train", 3, render=False)
    text = long_caption(scene)
    assert text.startswith(scene.caption)
    assert text.count(" is ") - scene.caption.count(" is ") == len(scene.objects)


def test_qa_answers_what_the_scene_holds() -> None:
    for i in range(20):
        scene = scenes.make_scene("train", i, render=False)
        question, answer = qa_pair(scene, np.random.default_rng(i))
        noun = question.split()[3]
        present = any(noun in (s for s, _ in scenes.CATEGORIES[c].nouns) for c in scene.objects)
        assert answer.startswith("Yes") == present, (question, answer, scene.objects)


def test_batches_carry_the_variant_and_label_only_the_answer() -> None:
    cfg = ModelConfig()
    variant = Variant(system_prompt=True, long_captions=True, qa_share=0.0)
    processor = build_processor(cfg, variant)
    batcher = PilotBatcher(processor, cfg, scenes.SEED, variant)
    ids, labels, _ = batcher.sample(0)
    tok = processor.tokenizer
    text = tok.decode(ids)
    assert text.startswith(tok.decode(tok(SYSTEM_PROMPT, add_special_tokens=False)["input_ids"]))
    assert tok.unk_token_id not in ids  # every word of the variant is in the vocabulary
    answer = [t for t in labels if t != -100]
    assert answer[-1] == tok.eos_token_id and tok.decode(answer[:-1]).strip().endswith(".")
    assert labels[: len(ids) - len(answer)] == [-100] * (len(ids) - len(answer))
    assert batcher.batch(range(2))["pixel_values"].shape == (2, 3, cfg.image_size, cfg.image_size)


def test_question_samples_ask_after_the_image_and_stay_in_vocabulary() -> None:
    cfg = ModelConfig()
    variant = Variant(qa_share=1.0)
    processor = build_processor(cfg, variant)
    batcher = PilotBatcher(processor, cfg, scenes.SEED, variant)
    tok = processor.tokenizer
    for i in range(5):
        ids, labels, _ = batcher.sample(i)
        assert tok.unk_token_id not in ids
        prompt = tok.decode([t for t, lb in zip(ids, labels, strict=True) if lb == -100])
        answer = tok.decode([t for t in labels if t != -100][:-1])
        assert "Is there" in prompt and answer.split()[0].rstrip(",") in ("Yes", "No")
