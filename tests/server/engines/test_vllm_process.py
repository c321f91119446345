"""The vLLM engine with its engine core in its own process (`--vllm.engine-core process`, vLLM's AsyncLLM), against
the reference engine on the tiny LLaVA: pairs whose rows reach the engine core one message each stay paired, the
telemetry crosses the process boundary, and over HTTP vLLM's own benchmark client gets no failed request."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("vllm")

from bench.vllm_client import client_args, run_client  # noqa: E402
from models.generation import ReferenceModel  # noqa: E402
from server.engines.vllm_process import VllmProcessEngine  # noqa: E402
from tests.helpers import LiveServer, base_settings, check_mixed_batch, image_message, png_bytes  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(tiny_model_dir: Callable[[str], Path]) -> Iterator[LiveServer]:
    settings = base_settings(tiny_model_dir("llava"), engine="vllm", max_batch_size=16, vllm={"engine_core": "process"})
    server = LiveServer(settings).start(timeout=300)
    yield server
    server.stop()


def test_the_engine_core_runs_in_its_own_process(live: LiveServer) -> None:
    assert isinstance(live.engine, VllmProcessEngine)


def test_mixed_batch_equals_reference_engine(live: LiveServer, tiny_model: Callable[[str], ReferenceModel]) -> None:
    """Every knob, contrast pairs greedy and sampled, telemetry: token for token the reference engine's."""
    check_mixed_batch(live.engine, tiny_model("llava"))


def test_http_stop_strings_cancellation_and_vllms_client(
    live: LiveServer, tiny_model_dir: Callable[[str], Path]
) -> None:
    body = {"messages": image_message("what do you see", png_bytes(3)), "max_tokens": 24, "conservativeness": 0.5}
    full = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120).json()
    text = full["choices"][0]["message"]["content"]
    assert text and full["telemetry"]["contrast_steps"] > 0
    stop = text.split()[2]
    cut = httpx.post(live.url + "/v1/chat/completions", json={**body, "stop": [stop]}, timeout=120).json()
    assert (
        cut["choices"][0]["finish_reason"] == "stop"
        and cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    )
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={**body, "stream": True, "max_tokens": 200}) as r:
        next(r.iter_lines())  # the client leaves after the first chunk
    n = 4
    args = client_args(
        live.url,
        live.engine.model_name,
        str(tiny_model_dir("llava")),
        num_prompts=n,
        concurrency=2,
        input_len=16,
        output_len=8,
        image_size=48,
    )
    result = run_client(args)
    assert result["failed"] == 0 and result["completed"] == n
    assert result["total_output_tokens"] == n * 8
    deadline = time.monotonic() + 30
    while live.engine.stats().cancelled_total == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live.engine.stats().cancelled_total >= 1  # the stream its client left was aborted
    assert live.engine.stats().running == 0
