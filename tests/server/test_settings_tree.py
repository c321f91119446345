"""The settings tree: nested groups (`settings.vllm`, `settings.kernels`) by flag and by their old environment names,
command line over environment over defaults, handed to the engines, and exported for vLLM's processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from server.__main__ import main
from server.settings import Settings, parse_cli
from sevi.engines.reference.transformers_engine import TransformersEngine
from sevi.engines.vllm.options import VllmOptions
from sevi.engines.vllm.vllm_engine import VllmEngine
from sevi.runtime import runtime_env
from tests.support.repo import REPO

KERNEL_VARS = (
    runtime_env.ALIGNED_KERNEL,
    runtime_env.PAGED_KERNEL,
    runtime_env.COMPILED_OPERATOR,
    runtime_env.KERNEL_CACHE,
    runtime_env.PLUGIN_DISABLE,
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test sets what it needs; monkeypatch puts back whatever the tests' own export() changed.
    for name in KERNEL_VARS:
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("SEVI_VLLM_"):
            monkeypatch.delenv(name)


def test_nested_groups_take_the_command_line_over_the_environment_over_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEVI_VLLM_TENSOR_PARALLEL_SIZE", "2")
    monkeypatch.setenv("SEVI_VLLM_MAX_MODEL_LEN", "512")
    monkeypatch.setenv("SEVI_ALIGNED_KERNEL", "torch")
    monkeypatch.setenv("SEVI_PAGED_KERNEL", "0")
    s = parse_cli(["--vllm.tensor-parallel-size", "4", "--kernels.aligned-kernel", "c", "--port", "9003"])
    assert s.vllm.tensor_parallel_size == 4 and s.kernels.aligned_kernel == "c"  # the flags
    assert s.vllm.max_model_len == 512 and s.kernels.paged_kernel is False  # the environment
    assert s.vllm.gpu_memory_utilization == 0.9 and s.kernels.compiled_operator is True  # the defaults
    assert s.port == 9003


def test_the_old_environment_names_still_set_every_group(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEVI_VLLM_ENFORCE_EAGER", "true")
    monkeypatch.setenv("SEVI_VLLM_ENGINE_ARGS", '{"max_num_batched_tokens": 4096}')
    monkeypatch.setenv("SEVI_VLLM_DISTRIBUTED_EXECUTOR_BACKEND", "mp")
    monkeypatch.setenv("SEVI_VLLM_DISABLE", "1")
    monkeypatch.setenv("SEVI_ALIGNED_KERNEL", " Triton ")  # read as the plugin reads it: case and spaces aside
    monkeypatch.setenv("SEVI_COMPILED_OPERATOR", "0")
    monkeypatch.setenv("SEVI_KERNEL_CACHE", str(tmp_path))
    s = Settings()
    assert s.vllm.enforce_eager is True and s.vllm.engine_args == {"max_num_batched_tokens": 4096}
    assert s.vllm.distributed_executor_backend == "mp" and s.vllm.disable is True
    assert s.kernels.aligned_kernel == "triton" and s.kernels.compiled_operator is False
    assert s.kernels.kernel_cache == tmp_path and s.kernels.paged_kernel is True
    # The group alone (tests and bench/ build VllmOptions(...)) reads its variables for what it is not given.
    alone = VllmOptions(max_model_len=256)  # type: ignore[call-arg]
    assert alone.enforce_eager is True and alone.max_model_len == 256


def test_defaults_without_environment() -> None:
    s = Settings()
    assert s.vllm == VllmOptions() and s.kernels.aligned_kernel is None
    assert s.runtime_options() == runtime_env.RuntimeOptions()  # the same defaults on both sides of the export


def test_bad_group_values_are_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SEVI_ALIGNED_KERNEL", "cuda")
    assert main([]) == 2
    assert "kernels.aligned_kernel" in capsys.readouterr().err
    monkeypatch.delenv("SEVI_ALIGNED_KERNEL")
    assert main(["--vllm.tensor-parallel-size", "0"]) == 2
    assert "vllm.tensor_parallel_size" in capsys.readouterr().err


def test_help_lists_the_nested_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_cli(["--help"])
    out = capsys.readouterr().out
    for flag in (
        "--vllm.tensor-parallel-size",
        "--vllm.enforce-eager",
        "--vllm.engine-args",
        "--vllm.disable",
        "--kernels.aligned-kernel",
        "--kernels.paged-kernel",
        "--kernels.compiled-operator",
        "--kernels.kernel-cache",
        "--max-batch-size",
    ):
        assert flag in out, flag


def test_engines_receive_the_groups(tmp_path: Path) -> None:
    s = parse_cli(
        [
            "--model",
            str(tmp_path),
            "--vllm.enforce-eager",
            "true",
            "--vllm.max-model-len",
            "300",
            "--kernels.aligned-kernel",
            "torch",
            "--kernels.compiled-operator",
            "false",
            "--vllm.disable",
            "true",
        ]
    )
    vllm = VllmEngine.from_settings(s)
    assert vllm.options is s.vllm and vllm.options.enforce_eager and vllm.options.max_model_len == 300
    want = runtime_env.RuntimeOptions(aligned_kernel="torch", compiled_operator=False, plugin_disabled=True)
    assert vllm.runtime == want
    assert TransformersEngine.from_settings(s).runtime == want


def test_export_reaches_this_process_and_its_children(tmp_path: Path) -> None:
    """What vLLM's worker processes see: the switches the server exported, read back by runtime_env in a child."""
    options = runtime_env.RuntimeOptions(
        aligned_kernel="torch", paged_kernel=False, compiled_operator=False, kernel_cache=tmp_path, plugin_disabled=True
    )
    runtime_env.export(options)
    assert runtime_env.current() == options
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util, sys; spec = importlib.util.spec_from_file_location('r', "
            f"{str(REPO / 'sevi' / 'runtime' / 'runtime_env.py')!r}); m = importlib.util.module_from_spec(spec); "
            "sys.modules['r'] = m; spec.loader.exec_module(m); print(m.current())",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert child.stdout.strip() == repr(options).replace("sevi.runtime.runtime_env.", "")
    runtime_env.export(runtime_env.RuntimeOptions())  # defaults: the variables are gone again
    assert not any(name in os.environ for name in KERNEL_VARS)


def test_the_reference_engine_loads_under_its_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The switches are in force when the engine builds the compiled operator (its first use), though the
    environment said otherwise."""
    import sevi.engines.reference.transformers_engine as te

    monkeypatch.setenv("SEVI_COMPILED_OPERATOR", "1")
    s = parse_cli(
        [
            "--model",
            str(tmp_path),
            "--kernels.compiled-operator",
            "false",
            "--kernels.kernel-cache",
            str(tmp_path),
            "--torch-threads",
            str(torch.get_num_threads()),
        ]
    )
    seen: list[runtime_env.RuntimeOptions] = []

    class Stop(Exception):
        pass

    def load(*args: Any, **kwargs: Any) -> None:
        raise Stop

    monkeypatch.setattr(te, "compiled_operator", lambda: seen.append(runtime_env.current()))
    monkeypatch.setattr(te.ReferenceModel, "load", load)
    with pytest.raises(Stop):
        te.TransformersEngine.from_settings(s)._load()
    assert seen == [s.runtime_options()] and not seen[0].compiled_operator and seen[0].kernel_cache == tmp_path


def test_the_vllm_engine_exports_before_vllm_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = parse_cli(["--model", str(tmp_path), "--kernels.aligned-kernel", "torch"])
    exported: list[runtime_env.RuntimeOptions] = []

    class Stop(Exception):
        pass

    def export(options: runtime_env.RuntimeOptions) -> None:
        exported.append(options)
        raise Stop  # before vLLM is imported or any worker starts

    monkeypatch.setattr(runtime_env, "export", export)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    with pytest.raises(Stop):
        VllmEngine.from_settings(s)._load()
    assert exported == [s.runtime_options()]


def test_only_runtime_env_touches_the_environment_below_the_settings() -> None:
    """The contract of sevi/runtime/runtime_env.py: no other module of sevi/ or server/ reads or writes os.environ
    (server/settings.py reads it through pydantic-settings, not by hand)."""
    pattern = re.compile(r"\bos\.(environ|getenv|putenv|unsetenv)\b|\bgetenv\(")
    modules = [path for folder in ("sevi", "server") for path in (REPO / folder).rglob("*.py")]
    offenders = [
        str(path.relative_to(REPO))
        for path in modules
        if path.name != "runtime_env.py" and pattern.search(path.read_text())
    ]
    assert offenders == []
