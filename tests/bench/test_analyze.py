"""bench.analyze: attention maps over prompt + caption, and the per-layer shares it reports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bench.analyze import analyze, attention_maps, plot
from sevi.engines.api import user_message
from sevi.engines.reference.generation import ReferenceModel
from tests.support.images import random_image

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_chunked_maps_equal_one_full_forward(family: str, tiny_model: Callable[[str], ReferenceModel]) -> None:
    model = tiny_model(family)
    enc = model.encode(user_message("please describe this image"), [random_image(2)])
    generated = [model.tokenizer.convert_tokens_to_ids(w) for w in ("a", "dog", "on", "the", "grass")]
    maps = attention_maps(model, enc, generated)
    full = {k: v.clone() for k, v in enc.items()}
    extra = torch.tensor([generated])
    full["input_ids"] = torch.cat([enc["input_ids"], extra], 1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(extra).int()], 1)
    cfg = model.model.config.get_text_config(decoder=True)
    before, cfg._attn_implementation = cfg._attn_implementation, "eager"
    try:
        with torch.inference_mode():
            want = model.model(**full, output_attentions=True).attentions
    finally:
        cfg._attn_implementation = before
    assert len(maps) == model.num_layers
    for got, ref in zip(maps, want, strict=True):
        torch.testing.assert_close(got, ref[0].float(), rtol=1e-4, atol=1e-5)


def test_shares_are_fractions_and_nothing_has_flowed_before_layer_0(
    tiny_model: Callable[[str], ReferenceModel], tmp_path: Path
) -> None:
    result = analyze(tiny_model("llava"), random_image(3), max_tokens=8)
    layers = result["layers"]
    assert len(layers) == 4
    for row in layers:
        for value in row.values():
            assert 0.0 <= value <= 1.0
    # Before the first layer every position holds only itself: text positions hold no image information.
    assert layers[0]["visual_info_text_side"] == 0.0
    assert layers[-1]["visual_info_text_side"] > 0.0
    plot(result, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000
