"""bench.startup: the stock anchor starts vLLM's own server with no plugin, and warm-up seconds are read from logs."""

from __future__ import annotations

import argparse

from bench.startup import command, warmup_seconds


def _args() -> argparse.Namespace:
    return argparse.Namespace(model="models/bundled", dtype="bfloat16", engine_core="thread")


def test_stock_start_is_vllms_own_server_without_the_plugin() -> None:
    cmd, env, ready = command("stock", _args(), 8123)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert env == {"VLLM_PLUGINS": "none", "VLLM_CPU_KVCACHE_SPACE": "1"}
    assert ready == "/health"
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"


def test_sevi_start_uses_the_same_model_and_dtype() -> None:
    cmd, env, ready = command("sevi", _args(), 8123)
    assert cmd[1:3] == ["-m", "server"]
    assert cmd[cmd.index("--model") + 1] == "models/bundled"
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert env == {"SEVI_VLLM_ENGINE_CORE": "thread"} and ready == "/ready"


def test_warmup_seconds_spans_midnight_and_needs_both_lines() -> None:
    log = (
        "INFO 12-08 23:59:58 [cpu_model_runner.py:87] Warming up model for the compilation...\n"
        "INFO 12-09 00:00:02 [cpu_model_runner.py:91] Warming up done.\n"
    )
    assert warmup_seconds(log) == 4.0
    assert warmup_seconds(log.splitlines()[0]) is None
