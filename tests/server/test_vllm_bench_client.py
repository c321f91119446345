"""vLLM's own benchmark client (`vllm bench serve`, openai-chat backend, random-mm dataset) runs against sevi-serve
with no request failing: it sends vLLM's `ignore_eos` (always, for random data), which the server honours."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.vllm_client import client_args, run_client
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.integration


def test_vllms_benchmark_client_gets_no_failed_request(server: LiveServer, llava_dir: Path) -> None:
    pytest.importorskip("vllm.benchmarks.serve")
    n, output_len = 6, 8
    args = client_args(
        server.url,
        server.engine.model_name,
        str(llava_dir),
        num_prompts=n,
        concurrency=3,
        input_len=16,
        output_len=output_len,
        image_size=48,
    )
    result = run_client(args)
    assert result["failed"] == 0 and result["completed"] == n, result.get("errors")
    assert result["total_output_tokens"] == n * output_len  # ignore_eos honoured: every request ran to its length
