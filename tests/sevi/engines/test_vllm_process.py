"""The vLLM engine with its engine core in its own process (`--vllm.engine-core process`, vLLM's AsyncLLM), against
the reference engine on the tiny LLaVA: pairs whose rows reach the engine core one message each stay paired, the
telemetry crosses the process boundary, and over HTTP vLLM's own benchmark client gets no failed request."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("vllm")

from bench.vllm_client import client_args, run_client  # noqa: E402
from sevi.engines.api import GenerationRequest, SamplingParams, user_message  # noqa: E402
from sevi.engines.reference.generation import ReferenceModel, run_to_completion  # noqa: E402
from sevi.engines.vllm.vllm_process import VllmProcessEngine  # noqa: E402
from sevi.method.knob import resolve_alignment  # noqa: E402
from tests.support.engines import DESCRIBE_PROMPT, EXPLICIT, check_mixed_batch, run_engine  # noqa: E402
from tests.support.images import image_message, png_bytes, random_image  # noqa: E402
from tests.support.live_server import LiveServer, base_settings  # noqa: E402
from tests.support.waiting import eventually  # noqa: E402

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
    eventually(
        lambda: live.engine.stats().cancelled_total >= 1, 30, 0.1, what="the stream its client left to be aborted"
    )
    assert live.engine.stats().running == 0


def test_vllm_sampling_extensions_equal_reference_engine(
    live: LiveServer, tiny_model: Callable[[str], ReferenceModel]
) -> None:
    """vLLM's repetition penalty and min_tokens (greedy): vLLM's sampler on rows without contrast, the SEVI logits
    processor on contrast pairs; tokens equal the reference engine's, and each extension changed them."""
    ref = tiny_model("llava")
    layers = ref.num_layers
    knobs = {
        "off": resolve_alignment(0, layers),
        "explicit+cd": resolve_alignment(None, layers, contrast=True, **EXPLICIT),  # type: ignore[arg-type]
    }
    extensions: dict[str, dict[str, Any]] = {
        "none": {},
        "repetition": {"repetition_penalty": 1.8},
        "min_tokens": {"min_tokens": 12},
    }
    images = [random_image(s) for s in (0, 15)]
    reqs = [
        GenerationRequest(
            f"{k}/{e}/{i}", user_message(DESCRIBE_PROMPT), [img], params, SamplingParams(max_tokens=24, **ext)
        )
        for i, img in enumerate(images)
        for k, params in knobs.items()
        for e, ext in extensions.items()
    ]
    got = run_engine(live.engine, reqs, timeout=600)
    want = run_to_completion(ref, reqs)
    for r in reqs:
        assert got[r.request_id][0] == want[r.request_id].token_ids, r.request_id
    for k in knobs:  # not vacuous: the repetition penalty changed tokens with and without contrast
        assert any(got[f"{k}/repetition/{i}"][0] != got[f"{k}/none/{i}"][0] for i in range(len(images))), k


def test_a_dead_engine_core_is_reported_and_refuses_requests(live: LiveServer) -> None:
    """vLLM's engine core process killed: /health and /ready answer 503 naming it, a new request gets a 503 (the
    health contract of issue 27, read from AsyncLLM). Last in this module: the engine stays dead."""
    import psutil

    cores = [
        p for p in psutil.Process().children(recursive=True) if " ".join(p.cmdline()).startswith("VLLM::EngineCore")
    ]
    assert len(cores) == 1, [p.cmdline() for p in psutil.Process().children(recursive=True)]
    cores[0].kill()
    eventually(
        lambda: httpx.get(live.url + "/ready", timeout=5).status_code == 503,
        timeout_s=30,
        what="/ready to answer 503 after the engine core was killed",
    )
    health = httpx.get(live.url + "/health", timeout=5)
    assert health.status_code == 503 and "engine core" in health.text
    body = {"messages": image_message("what do you see", png_bytes(3)), "max_tokens": 4}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead", r.text
