"""Where the image is (e and the "other" span) per family, several images included, and batch collation; the
family spec (sevi.families.SPECS) as the one source of what the engines, the plugin and the tiny builder read."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from jinja2 import Template

from sevi.engines.api import user_message
from sevi.engines.reference.generation import ReferenceModel
from sevi.families import DEFAULT_PROMPT, SPECS, Family, eos_token_ids, find_spec, render_prompt, spec_for
from tests.support.images import random_image


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_last_image_token_with_two_images(family: str, tiny_model: Callable[[str], ReferenceModel]) -> None:
    model = tiny_model(family)
    images = [random_image(1, (48, 40)), random_image(2, (64, 64))]
    enc = model.encode(user_message("what do you see", n_images=2), images)
    ids = enc["input_ids"][0]
    layout = model.family.image_layout(ids)
    image_positions = (ids == model.family.image_token_id).nonzero()[:, 0]
    # Both images' tokens are there (as many as each image alone gives), and e is the very last of them.
    singles = [
        int((model.encode(user_message("x"), [im])["input_ids"] == model.family.image_token_id).sum()) for im in images
    ]
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
    encs = [
        model.encode(user_message("hi"), [random_image(1, (40, 90))]),
        model.encode([{"role": "user", "content": "a longer text only prompt with more words"}], []),
        model.encode(user_message("what"), [random_image(2, (90, 40))]),
    ]
    batch = model.family.collate(encs, model.pad_id)
    width = max(e["input_ids"].shape[1] for e in encs)
    assert batch["input_ids"].shape == (3, width)
    for row, enc in enumerate(encs):
        n = enc["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, width - n :], enc["input_ids"][0])
        assert int(batch["attention_mask"][row].sum()) == n
        assert not batch["attention_mask"][row, : width - n].any()
    n_images = sum(1 for e in encs if "pixel_values" in e)
    if family == "qwen2_vl":
        assert batch["image_grid_thw"].shape[0] == n_images
    else:
        assert batch["pixel_values"].shape[0] == n_images


# ---- the spec is the single source of the family facts ------------------------------------------------------
@pytest.mark.parametrize("model_type", list(SPECS))
def test_spec_covers_what_both_engines_need(model_type: str) -> None:
    """Each spec names a model class that transformers (reference engine) and vLLM (the architecture the vLLM
    engine passes for folders without one) both have, an adapter, and a chat format whose turns hold the spec's
    image token and end with its EOS token."""
    import transformers

    spec = SPECS[model_type]
    assert spec.model_type == model_type
    assert issubclass(getattr(transformers, spec.architecture), transformers.PreTrainedModel)
    assert issubclass(spec.adapter, Family)
    chat = [*user_message(DEFAULT_PROMPT), {"role": "assistant", "content": "a dog"}]
    rendered = Template(spec.chat_template).render(messages=chat, add_generation_prompt=False)
    assert rendered.count(spec.image_token) == 1
    assert f"a dog{spec.eos_token}" in rendered
    vllm_models = pytest.importorskip("vllm.model_executor.models")
    assert spec.architecture in vllm_models.ModelRegistry.get_supported_archs()


def test_unknown_model_type_is_refused_naming_the_supported_ones() -> None:
    assert find_spec("gpt2") is None and find_spec(None) is None
    with pytest.raises(ValueError, match="supported: llava, llava_next, qwen2_vl, qwen2_5_vl"):
        spec_for("gpt2")


def test_eos_ids_read_configs_and_their_json_alike() -> None:
    """One reader for the config objects (reference engine, plugin) and the config.json dicts (vLLM engine):
    the text config's EOS first (the model config's where the text config names none), then the generation
    config's and the tokenizer's, each once."""
    tokenizer = SimpleNamespace(eos_token_id=7)
    nested = {"text_config": {"eos_token_id": [5, 6]}, "eos_token_id": 9}
    assert eos_token_ids(nested, {"eos_token_id": 6}, tokenizer) == (5, 6, 7)
    assert eos_token_ids({"text_config": {}, "eos_token_id": 9}) == (9,)
    assert eos_token_ids({"eos_token_id": 4}, None, SimpleNamespace(eos_token_id=None)) == (4,)
    assert eos_token_ids({}) == ()


@pytest.mark.parametrize("model_type", list(SPECS))
def test_tiny_builder_builds_each_family_from_its_spec(
    model_type: str, tiny_model_dir: Callable[[str], Path], tiny_model: Callable[[str], ReferenceModel]
) -> None:
    spec = SPECS[model_type]
    folder = tiny_model_dir(model_type)
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    assert config["model_type"] == model_type and config["architectures"] == [spec.architecture]
    model = tiny_model(model_type)
    tok = model.tokenizer
    assert type(model.model).__name__ == spec.architecture
    assert model.family.spec is spec and type(model.family) is spec.adapter
    assert model.family.image_token_id == tok.convert_tokens_to_ids(spec.image_token)
    assert model.processor.chat_template == spec.chat_template
    # Both engines stop on the spec's end-of-turn token and nothing else: the reference engine reads the loaded
    # configs, the vLLM engine the folder's JSON.
    eos = {tok.convert_tokens_to_ids(spec.eos_token)}
    assert model.eos_ids == eos == set(eos_token_ids(config, generation, tok))
    assert render_prompt(model.processor, user_message("hi")).count(spec.image_token) == 1


@pytest.mark.parametrize("model_type", list(SPECS))
def test_plugin_reads_the_facts_the_reference_engine_reads(
    model_type: str, tiny_model: Callable[[str], ReferenceModel]
) -> None:
    pytest.importorskip("vllm")
    from sevi.engines.vllm.plugin.logits_processor import model_facts

    model = tiny_model(model_type)
    facts = model_facts(model.model.config)
    assert facts == {
        "num_layers": model.num_layers,
        "image_token_id": model.family.image_token_id,
        "other_is_image_only": model.family.other_is_image_only,
        "eos_token_id": next(iter(model.eos_ids)),
    }
