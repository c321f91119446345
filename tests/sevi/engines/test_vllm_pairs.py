"""Contrast pairs under load and under memory preemption (sevi/engines/vllm/plugin/scheduler.py).

A tiny random LLaVA with 256 image tokens per prompt (about 270 tokens) and a token budget of 320 per
step: every prompt needs two steps and one image fills the encoder budget, so vLLM's stock scheduler gives
the two rows of a pair different steps (the pair would then be dissolved). Contrastive decoding is greedy
here and every request must equal the reference engine, which never splits a pair.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from sevi.engines.api import GenerationRequest, SamplingParams, user_message  # noqa: E402
from sevi.engines.reference.generation import ReferenceModel, run_to_completion  # noqa: E402
from sevi.method.knob import resolve_alignment  # noqa: E402
from sevi.method.telemetry import Telemetry  # noqa: E402
from sevi.testing.tiny import build  # noqa: E402
from tests.support.engines import run_engine, start_engine  # noqa: E402
from tests.support.images import random_image  # noqa: E402

pytestmark = pytest.mark.integration

PROMPT = "Please describe this image in detail."
KNOBS = {"omega": 3.0, "start_layer": 1, "kappa": 0.6}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llava-256")
    build("llava", out, seed=0, layers=4, heads=8, kv_heads=4, image_size=64, patch=4)  # 16 x 16 patches
    return out


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> ReferenceModel:
    return ReferenceModel.load(model_dir)


@pytest.fixture
def engine_with(model_dir: Path) -> Iterator[Callable[..., Any]]:
    """Start a vLLM engine on the model with extra EngineArgs; stopped after the test (one per process)."""
    from sevi.engines.vllm.options import VllmOptions
    from sevi.engines.vllm.vllm_engine import VllmEngine

    started: list[Any] = []

    def make(**engine_args: Any) -> Any:
        options = VllmOptions(max_model_len=512, engine_args=engine_args)
        engine = VllmEngine(str(model_dir), model_name="tiny", max_batch_size=4, options=options)
        started.append(start_engine(engine))
        return engine

    yield make
    for engine in started:
        asyncio.run(engine.stop())


def contrasted(n: int, max_tokens: int) -> list[GenerationRequest]:
    params = resolve_alignment(None, 4, contrast=True, **KNOBS)  # type: ignore[arg-type]
    return [
        GenerationRequest(
            f"pair/{i}",
            user_message(PROMPT),
            [random_image(i)],
            params,
            SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            contrast_images=[random_image(100 + i)],
        )
        for i in range(n)
    ]


def check(got: dict[str, tuple[list[int], Telemetry]], reqs: list[GenerationRequest], ref: ReferenceModel) -> None:
    dissolved = [rid for rid, (_, tel) in got.items() if tel.contrast_dissolved]
    assert dissolved == [], f"{len(dissolved)} of {len(got)} pairs dissolved"
    want = run_to_completion(ref, reqs)
    for r in reqs:
        ids, tel = got[r.request_id]
        assert ids == want[r.request_id].token_ids, r.request_id
        assert tel.contrast_steps == r.sampling.max_tokens, r.request_id  # every step contrasted


def test_pairs_stay_in_lockstep_under_a_small_token_budget(
    engine_with: Callable[..., Any], ref: ReferenceModel
) -> None:
    engine = engine_with(max_num_batched_tokens=320)
    reqs = contrasted(8, max_tokens=12)
    check(run_engine(engine, reqs), reqs, ref)


def test_pairs_are_preempted_and_resumed_together(
    engine_with: Callable[..., Any], ref: ReferenceModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KV cache of 13 blocks of 128: two pairs fit at admission (3 blocks a row) and each row needs a 4th
    block after about 110 tokens, so vLLM must preempt; the pairs still equal the reference engine."""
    from vllm.v1.core.sched.scheduler import Scheduler

    preempted: list[str] = []
    preempt = Scheduler._preempt_request

    def spied(self: Any, request: Any, *args: Any, **kwargs: Any) -> None:
        preempted.append(request.request_id)
        preempt(self, request, *args, **kwargs)

    monkeypatch.setattr(Scheduler, "_preempt_request", spied)
    engine = engine_with(num_gpu_blocks_override=14)  # one is vLLM's null block
    reqs = contrasted(4, max_tokens=130)
    check(run_engine(engine, reqs), reqs, ref)
    assert preempted  # not vacuous: memory did force preemption


def test_dissolved_pairs_are_counted_in_prometheus(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With vLLM's stock scheduler (what the engine ran before) the same load splits pairs; each request that
    finishes dissolved is counted in `sevi_contrast_pairs_dissolved_total`."""
    import httpx

    from tests.support.images import image_message, png_bytes
    from tests.support.live_server import LiveServer, base_settings

    monkeypatch.setenv("SEVI_VLLM_ENGINE_ARGS", '{"scheduler_cls": null, "max_num_batched_tokens": 320}')
    monkeypatch.setenv("SEVI_VLLM_MAX_MODEL_LEN", "512")
    live = LiveServer(base_settings(model_dir, engine="vllm", max_batch_size=4)).start(timeout=180)
    try:
        assert live.metric("sevi_contrast_pairs_dissolved_total") == 0
        body: dict[str, Any] = {
            "messages": image_message(PROMPT, png_bytes(0)),
            "max_tokens": 4,
            "alignment": dict(KNOBS, contrast=True),
        }

        async def send() -> list[int]:
            async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
                replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(8)))
            return [r.status_code for r in replies]

        assert asyncio.run(send()) == [200] * 8
        assert live.metric("sevi_contrast_pairs_dissolved_total") > 0
    finally:
        live.stop()
