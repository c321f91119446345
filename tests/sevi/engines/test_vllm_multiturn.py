"""Multi-turn conversations over vLLM's prefix cache (sevi/engines/vllm/plugin/scheduler.py).

Turn 2's prompt holds turn 1's prompt and answer. In turn 1 the last prompt row and every generated row were
aligned; in turn 2 they are prompt rows before the last one, which the spec (and the reference engine)
computes unaligned. vLLM caches full blocks of 128 tokens, so a turn 1 whose prompt and answer fill the
first block would hand turn 2 aligned keys and values if that block were cached. Checked on the tiny random
LLaVA and on the bundled model against the reference engine; and the blocks that are exact to share (image,
text before the last prompt row) are still shared, across knobs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from sevi.engines.api import GenerationRequest, SamplingParams, user_message  # noqa: E402
from sevi.engines.reference.generation import Completion, ReferenceModel, run_to_completion  # noqa: E402
from sevi.method.knob import AlignmentParams, resolve_alignment  # noqa: E402
from tests.support.engines import run_engine, start_engine  # noqa: E402
from tests.support.images import random_image  # noqa: E402
from tests.support.repo import BUNDLED  # noqa: E402

pytestmark = pytest.mark.integration

BLOCK = 128  # vLLM's KV block on CPU
KNOBS = {"omega": 3.0, "start_layer": 1, "kappa": 0.6}  # every head group populated on random models
# A long first question, so that turn 1's first block holds its last prompt row and some of its answer.
LONG_PROMPT = "Please describe this image in detail. " * 12
# Longer still: the first block lies wholly before the last prompt row (the part an aligned request caches).
LONGER_PROMPT = "Please describe this image in detail. " * 20


@pytest.fixture(scope="module", params=["tiny", "bundled"])
def model(
    request: pytest.FixtureRequest, tiny_model_dir: Callable[[str], Path]
) -> Iterator[tuple[Any, ReferenceModel]]:
    from sevi.engines.vllm.vllm_engine import VllmEngine

    if request.param == "bundled" and not (BUNDLED / "config.json").exists():
        pytest.skip("models/bundled not built")
    folder = tiny_model_dir("llava") if request.param == "tiny" else BUNDLED
    engine = start_engine(VllmEngine(str(folder), model_name=request.param))
    yield engine, ReferenceModel.load(folder)
    asyncio.run(engine.stop())


def generate(engine: Any, req: GenerationRequest) -> list[int]:
    return run_engine(engine, [req])[req.request_id][0]


def turn(rid: str, messages: list[dict[str, Any]], params: AlignmentParams, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        rid,
        messages,
        [random_image(7)],
        params,
        SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        contrast_images=[random_image(8)],
    )


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("contrast", [False, True])
def test_second_turn_over_the_prefix_cache_equals_reference(model: tuple[Any, ReferenceModel], contrast: bool) -> None:
    engine, ref = model
    params = resolve_alignment(None, ref.num_layers, contrast=contrast, **KNOBS)  # type: ignore[arg-type]
    first = turn(f"t1/{contrast}", user_message(LONG_PROMPT), params, max_tokens=48)
    one: Completion = run_to_completion(ref, [first])[first.request_id]
    assert generate(engine, first) == one.token_ids
    # The answer as its ids spell it: a plain decode drops the special tokens (<unk>, </s>) random models emit,
    # and turn 2's ids would then leave turn 1's within the first block.
    answer = ref.processor.tokenizer.decode(one.token_ids, skip_special_tokens=False)
    assert "<image>" not in answer
    messages = [
        *first.messages,
        {"role": "assistant", "content": answer},
        *user_message("What do you see in this image?", n_images=0),
    ]
    second = turn(f"t2/{contrast}", messages, params, max_tokens=24)
    two: Completion = run_to_completion(ref, [second])[second.request_id]
    # Not vacuous: turn 2's first block is turn 1's, aligned rows included (its last prompt row onward).
    shared = common_prefix(two.prompt_token_ids, one.prompt_token_ids + one.token_ids)
    assert len(one.prompt_token_ids) - 1 < BLOCK <= shared
    assert generate(engine, second) == two.token_ids


def prefix_cache_hits() -> float:
    from prometheus_client import REGISTRY

    return sum(
        s.value
        for family in REGISTRY.collect()
        if family.name == "vllm:prefix_cache_hits"
        for s in family.samples
        if s.name.endswith("_total")
    )


def test_image_and_prompt_blocks_are_shared_across_knobs(model: tuple[Any, ReferenceModel]) -> None:
    """An aligned request caches its blocks before its last prompt row; a request with the same image and
    text but other knobs (unaligned here, then aligned differently) reads them and still equals the reference."""
    engine, ref = model
    image = random_image(21)
    knobs = [
        resolve_alignment(None, ref.num_layers, contrast=False, **KNOBS),  # type: ignore[arg-type]
        resolve_alignment(0, ref.num_layers),
        resolve_alignment(1.0, ref.num_layers, contrast=False),
    ]
    reqs = [
        GenerationRequest(
            f"share/{i}", user_message(LONGER_PROMPT), [image], p, SamplingParams(max_tokens=8, ignore_eos=True)
        )
        for i, p in enumerate(knobs)
    ]
    generate(engine, reqs[0])
    for req in reqs[1:]:
        before = prefix_cache_hits()
        assert generate(engine, req) == run_to_completion(ref, [req])[req.request_id].token_ids, req.request_id
        assert prefix_cache_hits() - before >= BLOCK, req.request_id  # at least the first block came from the cache
