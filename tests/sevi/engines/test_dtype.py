"""`--dtype auto` (the default) picks what vLLM's own server would on this machine (sevi/engines/dtype.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from server.settings import Settings
from sevi.engines.dtype import checkpoint_dtype, resolve_dtype


def _folder(tmp_path: Path, saved: str | None, nested: bool = False) -> Path:
    config: dict[str, object] = {"model_type": "llava"}
    if saved is not None:
        if nested:
            config["text_config"] = {"dtype": saved}
        else:
            config["torch_dtype"] = saved
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _cpu(monkeypatch: pytest.MonkeyPatch, *, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


def test_the_default_is_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEVI_DTYPE", raising=False)  # the suite pins float32 (tests/conftest.py)
    assert Settings().dtype == "auto"


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "want"),
    [(False, False, "float32"), (True, False, "bfloat16"), (True, True, "bfloat16"), (False, True, "bfloat16")],
)
def test_auto_on_cpu_follows_native_bfloat16(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    avx512_bf16: bool,
    amx: bool,
    want: str,
) -> None:
    """AVX2-only CPUs keep float32 (bfloat16 is emulated there); AVX512_BF16 or AMX CPUs take bfloat16, as vLLM's
    CPU platform does, whatever the checkpoint was saved in."""
    _cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx)
    with caplog.at_level(logging.INFO, logger="sevi.engine"):
        assert resolve_dtype("auto", _folder(tmp_path, "float32"), on_gpu=False) == want
    assert f"dtype auto: {want}" in caplog.text  # the choice is logged, with why


@pytest.mark.parametrize(("saved", "bf16_gpu", "want"), [
    ("bfloat16", True, "bfloat16"),
    ("float16", True, "float16"),
    ("float32", True, "bfloat16"),
    ("float32", False, "float16"),
    (None, True, "bfloat16"),
])  # fmt: skip
def test_auto_on_gpu_follows_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saved: str | None, bf16_gpu: bool, want: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    assert resolve_dtype("auto", _folder(tmp_path, saved), on_gpu=True) == want


@pytest.mark.parametrize("explicit", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, explicit: str) -> None:
    _cpu(monkeypatch, avx512_bf16=True, amx=True)
    assert resolve_dtype(explicit, _folder(tmp_path, "float32"), on_gpu=False) == explicit
    assert resolve_dtype(explicit, _folder(tmp_path, "bfloat16"), on_gpu=True) == explicit


def test_checkpoint_dtype_is_read_from_the_config_or_its_text_config(tmp_path: Path) -> None:
    assert checkpoint_dtype(_folder(tmp_path, "bfloat16")) == "bfloat16"
    assert checkpoint_dtype(_folder(tmp_path, "float16", nested=True)) == "float16"
    assert checkpoint_dtype(_folder(tmp_path, None)) is None
    assert checkpoint_dtype(tmp_path / "missing") is None
