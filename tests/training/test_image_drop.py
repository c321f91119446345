"""training/image_drop.py: the training-only mask that hides the image from the text side in upper layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from training.image_drop import ImageDrop, blocks
from training.train_bundled import MICRO, build_model, build_processor, main


@pytest.fixture(scope="module")
def micro() -> LlavaForConditionalGeneration:
    processor = build_processor(MICRO)
    return build_model(MICRO, processor.tokenizer, seed=0).eval()


def _text_logits(model: LlavaForConditionalGeneration, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
    return out.logits[0, -3:]


def _inputs(model: LlavaForConditionalGeneration) -> tuple[torch.Tensor, int]:
    image = int(model.config.image_token_index)
    n = int(model.config.image_seq_length)
    return torch.tensor([[2, 5, *([image] * n), 6, 7, 8]]), image


def test_blocks_hide_only_image_keys_from_later_positions_of_chosen_rows() -> None:
    ids = torch.tensor([[1, 9, 9, 4, 5], [1, 9, 9, 4, 5]])
    got = blocks(ids, 9, torch.tensor([True, False]))
    assert got.shape == (2, 5, 5)
    assert not got[1].any()  # not chosen: nothing hidden
    assert got[0].nonzero().tolist() == [[3, 1], [3, 2], [4, 1], [4, 2]]  # rows after the image, image keys


def test_text_side_ignores_the_image_where_it_is_hidden_at_every_depth(micro: LlavaForConditionalGeneration) -> None:
    ids, image = _inputs(micro)
    a = torch.randn(1, 3, MICRO.image_size, MICRO.image_size, generator=torch.Generator().manual_seed(1))
    b = torch.randn(1, 3, MICRO.image_size, MICRO.image_size, generator=torch.Generator().manual_seed(2))
    assert (_text_logits(micro, ids, a) - _text_logits(micro, ids, b)).abs().max() > 1e-3  # stock: it reads it
    everywhere = ImageDrop(1.0, from_layer=0)
    everywhere.attach(micro)
    try:
        everywhere.choose(ids, image, step=0)
        torch.testing.assert_close(_text_logits(micro, ids, a), _text_logits(micro, ids, b))
        upper = ImageDrop(1.0, from_layer=1)  # lower layers still read the image: the text side carries it up
        upper.attach(micro)
        upper.choose(ids, image, step=0)
        assert (_text_logits(micro, ids, a) - _text_logits(micro, ids, b)).abs().max() > 1e-3
        no_one = ImageDrop(0.0, from_layer=0)  # a share of 0 picks no sample
        no_one.attach(micro)
        no_one.choose(ids, image, step=0)
        assert (_text_logits(micro, ids, a) - _text_logits(micro, ids, b)).abs().max() > 1e-3
    finally:
        everywhere.detach(micro)
    assert micro.config.get_text_config(decoder=True)._attn_implementation == "sdpa"


def test_choice_is_seeded_by_step() -> None:
    ids = torch.tensor([[1, 9, 4]] * 64)
    drop = ImageDrop(0.5, from_layer=1, seed=3)
    drop.choose(ids, 9, step=7)
    first = drop.blocked
    drop.choose(ids, 9, step=7)
    assert first is not None and torch.equal(first, drop.blocked)
    chosen = first.any(-1).any(-1)
    assert 10 < int(chosen.sum()) < 54  # about half of 64


def test_second_stage_starts_from_the_first_and_saves_a_stock_model(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    common = ["--micro", "--batch", "3", "--save-every", "2", "--log-every", "1", "--threads", "1", "--warmup", "1"]
    try:
        main(["--out", str(tmp_path / "one"), "--steps", "2", *common])
        main(
            ["--out", str(tmp_path / "two"), "--steps", "2", "--init-from", str(tmp_path / "one" / "latest"),
             "--sample-offset", "6", "--image-drop", "0.9", *common]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "two" / "latest" / "config.json").read_text())
    assert saved["text_config"].get("_attn_implementation") in (None, "sdpa")
    args = json.loads((tmp_path / "two" / "run.json").read_text())["args"]
    assert args["image_drop"] == 0.9 and args["sample_offset"] == 6
    # Started from stage one's weights: the first logged loss is stage one's level, not a fresh model's.
    first = [json.loads(x)["loss"] for x in (tmp_path / "one" / "loss.jsonl").read_text().splitlines()]
    second = [json.loads(x)["loss"] for x in (tmp_path / "two" / "loss.jsonl").read_text().splitlines()]
    assert second[0] < first[0]
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "two" / "latest")
    assert model.config.get_text_config(decoder=True)._attn_implementation != "image_drop"
