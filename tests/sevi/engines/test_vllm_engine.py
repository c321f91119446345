"""The vLLM engine against the reference engine on the tiny LLaVA: direct, then through HTTP (`--engine vllm`).

One vLLM engine for the whole module (behind one live server; the direct tests call the same engine),
in-process, float32, 1 GiB of KV cache. Equality tests also check that the alignment / the contrast
changed the output (random tiny models make SEVI a silent no-op unless kappa is chosen so that every
head group is populated: omega 3, start layer 1, kappa 0.6 does it here).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

pytest.importorskip("vllm")

from sevi.engines.api import GenerationRequest, RequestError, SamplingParams, user_message  # noqa: E402
from sevi.engines.reference.generation import ReferenceModel, run_to_completion  # noqa: E402
from sevi.engines.vllm.options import VllmOptions  # noqa: E402
from sevi.method.knob import AlignmentParams, resolve_alignment  # noqa: E402
from sevi.method.telemetry import Telemetry  # noqa: E402
from tests.support.engines import (  # noqa: E402
    DESCRIBE_PROMPT,
    EXPLICIT,
    check_mixed_batch,
    knob_set,
    mixed_batch,
    run_engine,
)
from tests.support.images import image_message, png_bytes, random_image  # noqa: E402
from tests.support.live_server import LiveServer, base_settings  # noqa: E402
from tests.support.waiting import eventually  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(tiny_model_dir: Callable[[str], Path]) -> Iterator[LiveServer]:
    # The `uni` executor (the CPU's default is `mp`): the tests spy on the worker's kernels in this process.
    settings = base_settings(
        tiny_model_dir("llava"), engine="vllm", max_batch_size=16, vllm=VllmOptions(distributed_executor_backend="uni")
    )
    server = LiveServer(settings).start(timeout=180)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ref(tiny_model: Callable[[str], ReferenceModel]) -> ReferenceModel:
    return tiny_model("llava")


def test_mixed_batch_equals_reference_engine(
    live: LiveServer, ref: ReferenceModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sevi.engines.vllm.plugin.cpu_backend as cpu_backend

    shares: list[tuple[int, int]] = []  # (rows the stock kernel computed, rows in the step), per step and row set
    stock_rows = cpu_backend.stock_rows

    def spied(md: Any, *args: Any, **kwargs: Any) -> Any:
        found = stock_rows(md, *args, **kwargs)
        if found is not None:
            shares.append((found.tokens.shape[0], md.num_actual_tokens))
        return found

    monkeypatch.setattr(cpu_backend, "stock_rows", spied)
    check_mixed_batch(live.engine, ref)
    # Steps whose aligned rows are some sequences' whole query (decode rows beside contrast and
    # unaligned rows) ran the stock kernel on the other rows only, and the tokens still equal the
    # reference engine's.
    assert any(0 < stock < total for stock, total in shares)


def test_mixed_batch_on_the_triton_kernel_equals_reference_engine(
    live: LiveServer, ref: ReferenceModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SEVI_ALIGNED_KERNEL=triton: the engine's aligned rows computed by the Triton kernels (here in Triton's
    interpreter, in this process: the uni executor), tokens and telemetry equal to the reference engine's, and
    /ready names the kernel."""
    from sevi.kernels import choice, triton_available

    why = triton_available()
    if why is not None:
        pytest.skip(f"Triton path untested: {why}")
    import sevi.kernels.sevi_decode as sevi_decode

    calls = []
    decode = sevi_decode.aligned_decode

    def spied(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(sevi_decode, "aligned_decode", spied)
    monkeypatch.setenv("SEVI_ALIGNED_KERNEL", "triton")
    choice.aligned_kernel.cache_clear()
    try:
        assert httpx.get(live.url + "/ready").json()["aligned_kernel"] == "triton"
        check_mixed_batch(live.engine, ref)
        assert calls, "the Triton kernels computed no aligned row"
    finally:
        choice.aligned_kernel.cache_clear()  # the next test reads the default again


def test_ready_names_the_default_aligned_kernel(live: LiveServer) -> None:
    """/ready says which path this machine runs: dtype, aligned kernel, and the cache layout vLLM picked here
    (found at run time, as vLLM finds it: AVX2, AVX-512 and AMX machines differ)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from sevi.kernels.paged_kv import kernel

    ready = httpx.get(live.url + "/ready").json()
    assert ready["aligned_kernel"] == ("c" if kernel() is not None else "torch")
    assert ready["dtype"] == "float32"  # tests serve float32 (tests/conftest.py)
    config = live.engine._engine.vllm_config
    head_size = config.model_config.get_head_size()
    assert ready["kv_cache_isa"] == _get_attn_isa(config.model_config.dtype, config.cache_config.block_size, head_size)
    assert ready["kv_cache_layout"] and ready["aligned_read"] == (
        "in place (C kernel)" if kernel() is not None else "gather (torch)"
    )


@pytest.mark.parametrize("knobs", ["explicit", "explicit+cd"])
def test_request_joining_aligned_decodes_equals_reference(
    live: LiveServer, ref: ReferenceModel, knobs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Aligned requests join while others decode: their prefill steps hold aligned decode rows, so the
    stock kernel runs on the joining prompt's rows alone, in place (one range); every output still equals
    the reference engine's for the same request. Long enough that each row's keys pass vLLM's block of 128
    at a different step: a row reaching its new block while a longer one already had two must read the
    block's new id (one stale id from the step plan changed these tokens). With contrastive decoding each
    request adds an unaligned contrast row, which the stock kernel computes beside the aligned ones."""
    import sevi.engines.vllm.plugin.cpu_backend as cpu_backend

    spans: list[tuple[int, int]] = []
    stock_rows = cpu_backend.stock_rows

    def spied(*args: Any, **kwargs: Any) -> Any:
        found = stock_rows(*args, **kwargs)
        if found is not None and found.span is not None:
            spans.append(found.span)
        return found

    monkeypatch.setattr(cpu_backend, "stock_rows", spied)
    params = knob_set(ref.num_layers)[knobs]
    reqs = [
        GenerationRequest(
            f"join/{i}",
            user_message(DESCRIBE_PROMPT),
            [random_image(10 + i)],
            params,
            SamplingParams(max_tokens=140, ignore_eos=True),
        )
        for i in range(3)
    ]

    async def staggered() -> dict[str, list[int]]:
        async def one(req: GenerationRequest, after: asyncio.Event | None, started: asyncio.Event) -> list[int]:
            if after is not None:
                await after.wait()
            ids: list[int] = []
            async for ev in live.engine.generate(req):
                if ev.token_id is not None:
                    ids.append(ev.token_id)
                    if len(ids) == 3:
                        started.set()  # the next request joins once this one decodes
            return ids

        events = [asyncio.Event() for _ in reqs]
        runs = [one(r, events[i - 1] if i else None, events[i]) for i, r in enumerate(reqs)]
        return dict(zip([r.request_id for r in reqs], await asyncio.gather(*runs), strict=True))

    got = asyncio.run(staggered())
    assert spans or params.contrast  # a prompt's rows ran alone through the stock kernel, in place
    for r in reqs:
        assert got[r.request_id] == run_to_completion(ref, [r])[r.request_id].token_ids, r.request_id


def test_alignment_off_requests_take_the_stock_path_and_match_the_mixed_batch(
    live: LiveServer, ref: ReferenceModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sevi.engines.vllm.plugin.step as steps  # the metadata builders build each step's plan there

    built: list[object] = []
    build_plan = steps.build_plan

    def counted(*args: Any, **kwargs: Any) -> Any:
        plan = build_plan(*args, **kwargs)
        built.append(plan)
        return plan

    monkeypatch.setattr(steps, "build_plan", counted)
    images = [random_image(s) for s in range(2)]
    mixed = mixed_batch(ref.num_layers, images)
    off = [r for r in mixed if r.request_id.startswith("c0/")]
    alone = run_engine(
        live.engine,
        [GenerationRequest("alone" + r.request_id, r.messages, r.images, r.alignment, r.sampling) for r in off],
    )
    # No aligned row in that batch: the backend never built a plan, i.e. vLLM's own kernel output only.
    assert built == []
    together = run_engine(live.engine, mixed)
    assert any(plan is not None for plan in built)  # the mixed batch did align (the spy sees plans)
    for r in off:
        assert alone["alone" + r.request_id][0] == together[r.request_id][0]


PENALTIES = {
    "frequency": {"frequency_penalty": 2.0},
    "presence": {"presence_penalty": 2.0},
    "both": {"frequency_penalty": -2.0, "presence_penalty": 1.0},
}


def test_penalties_equal_reference_engine(live: LiveServer, ref: ReferenceModel) -> None:
    """Greedy requests with OpenAI's presence / frequency penalties: vLLM's own sampler penalises the rows without
    contrast, the SEVI logits processor the contrast pairs (after combining their logits, where the reference
    engine penalises too); tokens and telemetry equal the reference engine's."""
    layers = ref.num_layers
    knobs = {
        "off": resolve_alignment(0, layers),
        "explicit": resolve_alignment(None, layers, contrast=False, **EXPLICIT),  # type: ignore[arg-type]
        "explicit+cd": resolve_alignment(None, layers, contrast=True, **EXPLICIT),
    }  # type: ignore[arg-type]
    # Images where each penalty changes a contrast pair's tokens. (Not random_image(1): there the frequency-penalised
    # aligned trajectory reaches a step whose head groups sit on a threshold, and the engines' float32 noise puts a
    # head on either side, penalties or not: same tokens forced into both, the logits differ at that one step.)
    images = [random_image(s) for s in (0, 15)]
    reqs = [
        GenerationRequest(
            f"{k}/{p}/{i}", user_message(DESCRIBE_PROMPT), [img], params, SamplingParams(max_tokens=24, **penalties)
        )  # type: ignore[arg-type]
        for i, img in enumerate(images)
        for k, params in knobs.items()
        for p, penalties in PENALTIES.items()
    ]
    got = run_engine(live.engine, reqs)
    want = run_to_completion(ref, reqs)
    for r in reqs:
        assert got[r.request_id][0] == want[r.request_id].token_ids, r.request_id
        assert got[r.request_id][1] == want[r.request_id].telemetry, r.request_id
    # Not vacuous: the penalties changed tokens, on rows without contrast and on contrast pairs.
    plain = run_to_completion(
        ref,
        [
            GenerationRequest(r.request_id, r.messages, r.images, r.alignment, SamplingParams(max_tokens=24))
            for r in reqs
        ],
    )
    changed = {r.request_id.split("/")[0] for r in reqs if plain[r.request_id].token_ids != got[r.request_id][0]}
    assert changed == set(knobs)


def test_bad_alignment_values_are_refused_by_validate_params(live: LiveServer) -> None:
    bad = AlignmentParams(conservativeness=0.5, omega=-1.0, start_layer=1, kappa=0.2, contrast=False)
    req = GenerationRequest("bad", user_message(DESCRIBE_PROMPT), [random_image(0)], bad, SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match="omega"):
        run_engine(live.engine, [req])


# ---- through HTTP ----------------------------------------------------------------------------------------
def reference_text(ref: ReferenceModel, png: bytes, params: AlignmentParams, max_tokens: int) -> str:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    req = GenerationRequest("h", user_message("what do you see"), [img], params, SamplingParams(max_tokens=max_tokens))
    return run_to_completion(ref, [req])["h"].text


def test_chat_completions_equal_reference(live: LiveServer, ref: ReferenceModel) -> None:
    png = png_bytes(3)
    body: dict[str, Any] = {
        "messages": image_message("what do you see", png),
        "max_tokens": 12,
        "alignment": dict(EXPLICIT, contrast=True),
    }
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    params = resolve_alignment(0.5, ref.num_layers, contrast=True, **EXPLICIT)  # type: ignore[arg-type]
    assert data["choices"][0]["message"]["content"] == reference_text(ref, png, params, 12)
    assert data["alignment"]["omega"] == 3.0 and data["telemetry"]["stage2_rows"] > 0


def test_openai_client_plain_and_streaming(live: LiveServer, ref: ReferenceModel) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none")
    png = png_bytes(4)
    kwargs: dict[str, Any] = dict(
        model=live.engine.model_name,
        messages=image_message("what do you see", png),
        max_tokens=10,
        extra_body={"conservativeness": 1.0, "alignment": {"contrast": False}},
    )
    plain = client.chat.completions.create(**kwargs)
    text = plain.choices[0].message.content
    assert text == reference_text(ref, png, resolve_alignment(1.0, ref.num_layers, contrast=False), 10)
    chunks = client.chat.completions.create(stream=True, **kwargs)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text


def test_openai_client_penalties_and_refusals(live: LiveServer, ref: ReferenceModel) -> None:
    """Through the official client on the vLLM engine: penalised greedy text is the reference engine's (contrast
    pair included), and a field the server cannot honour is a 400 naming it."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
    png = png_bytes(0)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    params = resolve_alignment(None, ref.num_layers, contrast=True, **EXPLICIT)  # type: ignore[arg-type]
    penalties = {"frequency_penalty": 2.0, "presence_penalty": 1.0}
    got = client.chat.completions.create(
        model=live.engine.model_name,
        messages=image_message(DESCRIBE_PROMPT, png),
        max_tokens=24,
        extra_body={"alignment": dict(EXPLICIT, contrast=True)},
        **penalties,
    )
    want = run_to_completion(
        ref,
        [
            GenerationRequest(
                "p", user_message(DESCRIBE_PROMPT), [image], params, SamplingParams(max_tokens=24, **penalties)
            )
        ],
    )["p"]
    plain = run_to_completion(
        ref, [GenerationRequest("p", user_message(DESCRIBE_PROMPT), [image], params, SamplingParams(max_tokens=24))]
    )["p"]
    assert got.choices[0].message.content == want.text != plain.text
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=live.engine.model_name,
            messages=image_message(DESCRIBE_PROMPT, png),
            response_format={"type": "json_object"},
        )
    assert caught.value.param == "response_format"


def test_bad_conservativeness_is_a_400(live: LiveServer) -> None:
    body = {"messages": image_message("what do you see", png_bytes(1)), "conservativeness": 1.5}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "conservativeness"


def test_caption_multipart_and_cancelled_stream_frees_the_engine(live: LiveServer) -> None:
    r = httpx.post(
        live.url + "/caption",
        files={"image": ("a.png", png_bytes(2), "image/png")},
        data={"conservativeness": "balanced", "max_tokens": "6"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["alignment"]["contrast"] is True
    body = {
        "messages": image_message("what do you see", png_bytes(5)),
        "max_tokens": 400,
        "stream": True,
        "alignment": {"omega": 1.0, "contrast": True},
    }
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("choices"):
                break  # first token seen: hang up
    engine: Any = live.engine
    eventually(
        lambda: engine.stats().running == 0 and not engine._jobs,
        timeout_s=10,
        what="the engine to drop the stream its client left (nothing running, no job)",
    )


def test_metrics_include_vllms_own(live: LiveServer) -> None:
    """/metrics carries vLLM's `vllm:*` families beside ours, and they move with traffic."""
    with live.client() as client:
        assert (
            client.post(
                "/caption",
                files={"image": ("a.png", png_bytes(3), "image/png")},
                data={"conservativeness": "0", "max_tokens": "3"},
            ).status_code
            == 200
        )
        text = client.get("/metrics").text
    assert "sevi_requests_total" in text
    assert "vllm:num_requests_running" in text
    prompt_tokens = [
        float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith("vllm:prompt_tokens_total{")
    ]
    assert prompt_tokens and sum(prompt_tokens) > 0


def test_engine_computes_on_every_core_but_one(live: LiveServer) -> None:
    from sevi.engines.api import default_cpu_threads

    assert live.settings.torch_threads is None and live.engine.compute_threads == default_cpu_threads()


def test_ignore_eos_runs_to_max_tokens(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in the reference engine: with ignore_eos an EOS token neither stops vLLM (stop_token_ids) nor the
    engine's own token rules; without it the request stops there."""
    params = resolve_alignment(0, live.engine.num_layers)

    def run(rid: str, **sampling: Any) -> tuple[list[int], str | None]:
        req = GenerationRequest(
            rid, user_message(DESCRIBE_PROMPT), [random_image(1)], params, SamplingParams(max_tokens=8, **sampling)
        )

        async def go() -> tuple[list[int], str | None]:
            ids, finish = [], None
            async for ev in live.engine.generate(req):
                if ev.token_id is not None:
                    ids.append(ev.token_id)
                finish = ev.finish_reason or finish
            return ids, finish

        return asyncio.run(go())

    full, _ = run("full")
    assert len(full) == 8
    monkeypatch.setattr(live.engine, "_eos", {full[2]})  # make the third token an EOS
    stopped, finish = run("stopped")
    assert finish == "stop" and len(stopped) <= 3
    kept, finish = run("kept", ignore_eos=True)
    assert kept == full and finish == "length"


def _run_one(live: LiveServer, rid: str, params: AlignmentParams) -> tuple[list[int], Telemetry]:
    req = GenerationRequest(rid, user_message(DESCRIBE_PROMPT), [random_image(1)], params, SamplingParams(max_tokens=8))
    return run_engine(live.engine, [req], timeout=120)[rid]  # a dead worker thread would leave it waiting


def test_telemetry_counted_under_inference_mode_is_collected(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found serving a 16-layer model: once an unchanged batch had counted its pending layers (inside vLLM's
    inference mode), collecting a finished request's telemetry raised and killed the engine thread, and every
    request after it waited out its deadline. The count must also not depend on when it is taken."""
    from sevi.engines.vllm.plugin import state

    params = resolve_alignment(None, live.engine.num_layers, **EXPLICIT)  # type: ignore[arg-type]
    ids, counted_at_the_end = _run_one(live, "count-late", params)
    monkeypatch.setattr(state, "_MAX_PENDING", 1)  # count at every step, under inference mode
    ids_again, counted_each_step = _run_one(live, "count-each-step", params)
    assert ids_again == ids
    assert counted_each_step == counted_at_the_end
    assert counted_each_step.aligned_rows > 0


@pytest.mark.parametrize("broken", ["vllm_step", "telemetry"])
def test_a_failing_turn_fails_its_requests_and_the_engine_serves_on(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    """A vLLM step that raises, or a bug past it (telemetry collection), ends the requests the turn held with a
    500 in the API's error format at once, and the next request is served: the worker thread lives on."""
    params = resolve_alignment(1.0, live.engine.num_layers)
    failed_before = live.engine.stats().failed_batches_total

    def fail(*args: Any) -> Any:
        raise RuntimeError(f"{broken} is broken")

    with monkeypatch.context() as m:
        if broken == "vllm_step":
            m.setattr(live.engine._engine, "step", fail)
        else:
            m.setattr(live.engine, "_collect_telemetry", fail)
        with live.client() as c:
            r = c.post("/caption", json={"image": base64.b64encode(png_bytes(3)).decode(), "max_tokens": 6})
        assert r.status_code == 500, r.text
        assert f"{broken} is broken" in r.json()["error"]["message"]
    assert live.engine.stats().failed_batches_total == failed_before + 1
    _run_one(live, "after-the-failure", params)  # returns once the final event came (raises on a 500's error)
    assert live.engine.stats().running == 0
