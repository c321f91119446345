"""gpu-check's engine tier runs end to end on the CPU at the tiny models' width (its GPU run needs vLLM on a GPU
server): the vLLM engine and the reference engine agree on every request of the mixed batch in float32."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from bench import gpu_engine_tier  # noqa: E402

pytestmark = pytest.mark.integration


def test_engine_tier_agreement_runs_on_cpu() -> None:
    report = gpu_engine_tier.main(
        [
            "--device",
            "cpu",
            "--width",
            "tiny",
            "--dtype",
            "float32",
            "--layers",
            "2",
            "--image-tokens",
            "16",
            "--images",
            "1",
            "--max-tokens",
            "8",
            "--no-throughput",
        ]
    )
    agreement = report["agreement"]
    # float32 on a CPU: every request equal to the reference engine, telemetry included.
    for name, row in agreement["by_knob"].items():
        assert row["equal"] == row["requests"] == row["telemetry_equal"], (name, row)
    assert agreement["pass"] and agreement["by_knob"]["explicit"]["stage1_rows"] > 0
    assert agreement["by_knob"]["explicit+cd"]["contrast_steps"] > 0
    assert "throughput" not in report


def test_gpu_device_refused_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_info:
        gpu_engine_tier.main(["--device", "cuda", "--no-throughput"])
    assert exit_info.value.code == 2
