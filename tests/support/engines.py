"""Engines under test: started until loaded, fed requests together, and the mixed batch (every kind of knob, with
and without contrast, greedy and sampled) whose tokens and telemetry must equal the reference engine's."""

from __future__ import annotations

import asyncio

from PIL import Image

from sevi.engines.api import Engine, GenerationRequest, SamplingParams, user_message
from sevi.engines.reference.generation import ReferenceModel, run_to_completion
from sevi.method.knob import AlignmentParams, resolve_alignment
from sevi.method.telemetry import Telemetry
from tests.support.images import random_image
from tests.support.waiting import eventually


def start_engine(engine: Engine, timeout: float = 300) -> Engine:
    """Start an engine and wait until its model is loaded (fails with the engine's load error)."""
    asyncio.run(engine.start())

    def loaded() -> bool:
        assert engine.load_error is None, engine.load_error  # a failed load ends the wait at once
        return engine.ready

    eventually(loaded, timeout_s=timeout, interval_s=0.1, what=f"{type(engine).__name__} to load its model")
    return engine


DESCRIBE_PROMPT = "Please describe this image in detail."
# Random tiny models make SEVI a silent no-op unless kappa is chosen so that every head group is populated.
EXPLICIT = {"omega": 3.0, "start_layer": 1, "kappa": 0.6}


def run_engine(
    engine: Engine, requests: list[GenerationRequest], timeout: float | None = None
) -> dict[str, tuple[list[int], Telemetry]]:
    """All requests submitted together; generated ids (EOS excluded, as the reference reports) and telemetry.
    With a timeout a stalled engine fails the test instead of hanging it."""

    async def one(req: GenerationRequest) -> tuple[list[int], Telemetry]:
        ids: list[int] = []
        telemetry = Telemetry()
        async for ev in engine.generate(req):
            if ev.token_id is not None and not (ev.finish_reason == "stop" and not ev.text and ev.token_id in eos):
                ids.append(ev.token_id)
            telemetry = ev.telemetry or telemetry
        return ids, telemetry

    eos: set[int] = getattr(engine, "_eos", set())

    async def all_() -> list[tuple[list[int], Telemetry]]:
        return await asyncio.gather(*(one(r) for r in requests))

    return dict(zip([r.request_id for r in requests], asyncio.run(asyncio.wait_for(all_(), timeout)), strict=True))


def knob_set(layers: int) -> dict[str, AlignmentParams]:
    return {
        "c0": resolve_alignment(0, layers),
        "c05": resolve_alignment(0.5, layers),  # contrast on by default above 0
        "c1": resolve_alignment(1.0, layers, contrast=False),
        "explicit": resolve_alignment(None, layers, contrast=False, **EXPLICIT),  # type: ignore[arg-type]
        "explicit+cd": resolve_alignment(None, layers, contrast=True, **EXPLICIT),  # type: ignore[arg-type]
    }


def mixed_batch(layers: int, images: list[Image.Image], max_tokens: int = 20) -> list[GenerationRequest]:
    reqs = [
        GenerationRequest(
            f"{name}/{i}", user_message(DESCRIBE_PROMPT), [img], params, SamplingParams(max_tokens=max_tokens)
        )
        for i, img in enumerate(images)
        for name, params in knob_set(layers).items()
    ]
    # Sampled contrastive decoding: the pair samples with the reference engine's sampler, seeded.
    reqs.append(
        GenerationRequest(
            "sampled+cd/0",
            user_message(DESCRIBE_PROMPT),
            [images[0]],
            knob_set(layers)["explicit+cd"],
            SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.9, seed=11),
        )
    )
    return reqs


def check_mixed_batch(engine: Engine, ref: ReferenceModel) -> None:
    images = [random_image(s) for s in range(2)]
    reqs = mixed_batch(ref.num_layers, images)
    got = run_engine(engine, reqs)
    want = run_to_completion(ref, reqs)
    for r in reqs:
        assert got[r.request_id][0] == want[r.request_id].token_ids, r.request_id
        assert got[r.request_id][1] == want[r.request_id].telemetry, r.request_id
    # Not vacuous: both stages fired (every head group populated), alignment and contrast changed tokens.
    for i in range(len(images)):
        assert got[f"explicit/{i}"][1].stage1_rows > 0 and got[f"explicit/{i}"][1].stage2_rows > 0
        assert got[f"explicit+cd/{i}"][1].contrast_steps > 0
        assert not got[f"explicit+cd/{i}"][1].contrast_dissolved
    assert any(got[f"explicit/{i}"][0] != got[f"c0/{i}"][0] for i in range(len(images)))
    assert any(got[f"explicit+cd/{i}"][0] != got[f"explicit/{i}"][0] for i in range(len(images)))
