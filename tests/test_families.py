"""Where the image is (e and the "other" span) per family, several images included, and batch collation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from models.generation import ReferenceModel, user_message
from tests.conftest import random_image


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_last_image_token_with_two_images(family: str, tiny_model: Callable[[str], ReferenceModel]) -> None:
    model = tiny_model(family)
    images = [random_image(1, (48, 40)), random_image(2, (64, 64))]
    enc = model.encode(user_message("what do you see", n_images=2), images)
    ids = enc["input_ids"][0]
    layout = model.family.image_layout(ids)
    image_positions = (ids == model.family.image_token_id).nonzero()[:, 0]
    # Both images' tokens are there (as many as each image alone gives), and e is the very last of them.
    singles = [int((model.encode(user_message("x"), [im])["input_ids"] == model.family.image_token_id).sum())
               for im in images]
    assert len(image_positions) == sum(singles)
    assert layout.last_image == int(image_positions[-1])
    assert ids[layout.last_image + 1] != model.family.image_token_id
    assert layout.image_mask.sum() == len(image_positions)
    assert model.family.other_is_image_only == family.startswith("qwen")


def test_no_image_means_no_alignment_anchor(tiny_model: Callable[[str], ReferenceModel]) -> None:
    model = tiny_model("llava")
    enc = model.encode([{"role": "user", "content": "what do you see"}], [])
    assert model.family.image_layout(enc["input_ids"][0]).last_image == -1


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_collate_left_pads_and_stacks_images(family: str, tiny_model: Callable[[str], ReferenceModel]) -> None:
    model = tiny_model(family)
    encs = [model.encode(user_message("hi"), [random_image(1, (40, 90))]),
            model.encode([{"role": "user", "content": "a longer text only prompt with more words"}], []),
            model.encode(user_message("what"), [random_image(2, (90, 40))])]
    batch = model.family.collate(encs, model.pad_id)
    width = max(e["input_ids"].shape[1] for e in encs)
    assert batch["input_ids"].shape == (3, width)
    for row, enc in enumerate(encs):
        n = enc["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, width - n:], enc["input_ids"][0])
        assert int(batch["attention_mask"][row].sum()) == n
        assert not batch["attention_mask"][row, : width - n].any()
    n_images = sum(1 for e in encs if "pixel_values" in e)
    if family == "qwen2_vl":
        assert batch["image_grid_thw"].shape[0] == n_images
    else:
        assert batch["pixel_values"].shape[0] == n_images
