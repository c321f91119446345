"""Which vLLM executor a one-process engine gets: `mp` on a CPU unless /dev/shm cannot hold its worker queues (a
container started without --shm-size has 64 MB), then `uni` with a warning that names the fix; never on GPUs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sevi.engines.vllm.vllm_engine import default_executor, mp_shm_bytes, shm_free_bytes

pytest.importorskip("vllm")

MiB = 1 << 20


def test_mp_needs_room_for_both_of_vllms_queues() -> None:
    # vLLM 0.32 refused a 64 MB /dev/shm with "160 MiB required" for the request queue alone; the response queue
    # comes on top, so the check must ask for more than that.
    assert mp_shm_bytes() > 160 * MiB


def test_cpu_with_room_takes_mp() -> None:
    assert default_executor(1, on_gpu=False, shm_free=mp_shm_bytes()) == "mp"


def test_cpu_in_a_default_container_takes_uni_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sevi.engine.vllm"):
        assert default_executor(1, on_gpu=False, shm_free=62 * MiB) == "uni"
    (record,) = [r for r in caplog.records if "executor" in r.getMessage()]
    assert "--shm-size" in record.getMessage() and "62 MiB" in record.getMessage()


def test_parallel_cpu_engines_keep_mp_for_vllm_to_judge() -> None:
    # TP/PP on a CPU needs worker processes: falling back would change what the user asked for.
    assert default_executor(2, on_gpu=False, shm_free=1) == "mp"


def test_gpus_are_not_affected_by_shm() -> None:
    assert default_executor(1, on_gpu=True, shm_free=1) == "uni"
    assert default_executor(4, on_gpu=True, shm_free=1) is None


def test_shm_free_bytes_reads_the_mount_or_says_none(tmp_path: Path) -> None:
    assert shm_free_bytes(str(tmp_path)) is not None
    assert shm_free_bytes(str(tmp_path / "absent")) is None
