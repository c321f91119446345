"""The bundled-model training script on a micro config: steps, logs, resume, saved layout, serving parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.support.repo import BUNDLED
from training import scenes
from training.train_bundled import MICRO, PROMPTS, Batcher, build_processor, lr_at, main, plot_loss_curve

ARGS = ["--micro", "--batch", "3", "--save-every", "2", "--log-every", "1", "--threads", "1", "--warmup", "2"]


def _run(out: Path, steps: int) -> None:
    threads = torch.get_num_threads()
    try:
        main(["--out", str(out), "--steps", str(steps), *ARGS])
    finally:
        torch.set_num_threads(threads)  # the script sets it process-wide; leave other tests as they were


def _log_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One run straight to 5 steps; one to 3 steps, then resumed to 5."""
    straight = tmp_path_factory.mktemp("straight")
    _run(straight, 5)
    resumed = tmp_path_factory.mktemp("resumed")
    _run(resumed, 3)
    assert torch.load(resumed / "ckpt.pt", weights_only=False)["step"] == 3
    _run(resumed, 5)
    return straight, resumed


def test_logs_and_checkpoint(runs: tuple[Path, Path]) -> None:
    straight, resumed = runs
    assert _log_steps(straight) == [1, 2, 3, 4, 5]
    assert _log_steps(resumed) == [1, 2, 3, 4, 5]  # no duplicated rows after the resume
    assert torch.load(straight / "ckpt.pt", weights_only=False)["step"] == 5
    assert json.loads((straight / "latest" / "train_state.json").read_text())["step"] == 5


def test_resume_equals_uninterrupted_run(runs: tuple[Path, Path]) -> None:
    a = torch.load(runs[0] / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(runs[1] / "ckpt.pt", weights_only=False)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    la = [json.loads(x)["loss"] for x in (runs[0] / "loss.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (runs[1] / "loss.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4)


def test_saved_folder_loads_in_llava_hf_layout(runs: tuple[Path, Path]) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = runs[0] / "latest"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    vision = [k for k in keys if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    trained = torch.load(runs[0] / "ckpt.pt", weights_only=False)["model"]
    loaded = model.state_dict()
    assert set(loaded) == set(trained)
    for key, value in trained.items():
        assert torch.equal(loaded[key], value), key
    assert processor.chat_template
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


def test_training_inputs_match_the_serving_processor() -> None:
    processor = build_processor(MICRO)
    batcher = Batcher(processor, MICRO, scenes.SEED)
    scene = scenes.make_scene("in-prior", 0)
    for k, prompt in enumerate(PROMPTS):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        served = processor(images=[scene.image], text=[text], return_tensors="pt")
        assert served["input_ids"][0].tolist() == batcher.prompt_ids[k]
        assert (served["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 36
        torch.testing.assert_close(served["pixel_values"][0], batcher.pixels(scene.image), atol=1e-5, rtol=0)
    batch = batcher.batch(range(4))
    unk = processor.tokenizer.unk_token_id
    assert not (batch["input_ids"] == unk).any()
    # Loss only on caption tokens: labels start after the prompt and end with </s>.
    row_labels = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert row_labels[-1] == processor.tokenizer.eos_token_id
    assert len(row_labels) < batch["attention_mask"][0].sum()


def test_lr_schedule() -> None:
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.55)


def test_loss_curve_plot(runs: tuple[Path, Path], tmp_path: Path) -> None:
    from PIL import Image

    plot_loss_curve(runs[0] / "loss.jsonl", tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as image:
        assert image.format == "PNG"
        image.load()  # the whole file decodes
        assert any(low < high for low, high in image.convert("RGB").getextrema())  # something is drawn


def test_export(runs: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    main(["--out", str(runs[0]), "--export", str(tmp_path / "m")])
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert model.config.architectures == ["LlavaForConditionalGeneration"]
    assert model.config.image_seq_length == 36
    trained = torch.load(runs[0] / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    assert AutoProcessor.from_pretrained(tmp_path / "m").tokenizer.eos_token == "</s>"
    assert (tmp_path / "m" / "loss_curve.csv").read_text().count("\n") == 6
    assert (tmp_path / "m" / "loss_curve.png").exists()


@pytest.mark.integration
@pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason="models/bundled not built")
def test_bundled_model_captions_scenes() -> None:
    """The shipped model: size bound, LLaVA-hf layout, and it names what is in held-out scenes."""
    from bench.eval_bundled import evaluate

    assert (BUNDLED / "model.safetensors").stat().st_size <= 40 * 2**20
    with safe_open(str(BUNDLED / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert all(k.startswith("vision_tower.vision_model.") for k in names if k.startswith("vision_tower."))
    res = evaluate(BUNDLED, 40, ("in-prior", "counter-prior"), progress=False)
    assert res["in-prior"]["summary"]["recall"] >= 0.7
    # Prior-driven hallucination is part of the design: the SEVI knob has something to reduce.
    assert res["counter-prior"]["summary"]["chair_s"] >= 0.15
