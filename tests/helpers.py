"""Helpers shared by the test modules (no fixtures: those live in the conftest files, which import from here).

Sections: the repository, images and engines, live HTTP servers, the vLLM engine's mixed batch, the vLLM
plugin's unit tests.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from models.generation import GenerationRequest, ReferenceModel, SamplingParams, run_to_completion, user_message
from models.knob import AlignmentParams, resolve_alignment
from models.telemetry import Telemetry
from server.app import create_app
from server.engines.base import Engine
from server.settings import Settings

if TYPE_CHECKING:
    from models.vllm_plugin.logits_processor import SeviLogitsProcessor

# --- the repository -------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "bundled"

# GQA everywhere (8 query heads over 4 KV heads for LLaVA; Qwen2-VL 4 over 2), head_dim 32.
TINY_KWARGS = {
    "llava": {"layers": 4, "heads": 8, "kv_heads": 4},
    "llava_next": {"layers": 4, "heads": 8, "kv_heads": 4},
    "qwen2_vl": {"layers": 4, "heads": 4, "kv_heads": 2},
    "qwen2_5_vl": {"layers": 4, "heads": 4, "kv_heads": 2},
}

# --- images and engines ---------------------------------------------------------------------------------------


def random_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def start_engine(engine: Engine, timeout: float = 300) -> Engine:
    """Start an engine and wait until its model is loaded (fails with the engine's load error)."""
    asyncio.run(engine.start())
    deadline = time.monotonic() + timeout
    while not engine.ready and time.monotonic() < deadline:
        assert engine.load_error is None, engine.load_error
        time.sleep(0.1)
    assert engine.ready, f"the engine did not load within {timeout} s"
    return engine


# --- live HTTP servers ----------------------------------------------------------------------------------------

IMAGE_SERVER_PATH = "/pic.png"


class LiveServer:
    """create_app(settings) served by uvicorn on a pre-bound loopback socket (no port race). `engine` and
    `exit_process` go to create_app (a stub engine; a hook that records the exit a dead engine asks for)."""

    def __init__(
        self, settings: Settings, engine: Engine | None = None, exit_process: Callable[[int], None] | None = None
    ) -> None:
        self.settings = settings
        self.app = create_app(settings, engine, exit_process)
        self.engine = self.app.state.engine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    # The first server of a run with an empty kernel cache builds the CPU kernels at load (the paged K/V kernel,
    # the compiled operator): about 15 s on two idle cores, past 60 s when they are shared (seen: 64 tests
    # erred on one slow start).
    def start(self, timeout: float = 240) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server on {self.url} did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample from /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics").text
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items())) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == want or _normalise(key) == want:
                return float(value)
        return 0.0


def _normalise(key: str) -> str:
    if "{" not in key:
        return key
    name, _, rest = key.partition("{")
    pairs = sorted(p for p in rest.rstrip("}").split(",") if p)
    return name + "{" + ",".join(pairs) + "}"


def base_settings(model: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        model=model,
        engine="transformers",
        max_batch_size=8,
        max_queue=64,
        max_tokens_limit=1000,
        default_max_tokens=8,
        max_request_bytes=1024 * 1024,
        max_image_bytes=256 * 1024,
        max_image_pixels=512 * 512,
        max_images_per_request=2,
        default_conservativeness=0.5,
        request_timeout_s=60,
    )
    values.update(overrides)
    return Settings(**values)


def png_bytes(seed: int = 1, size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    random_image(seed, size).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def image_message(text: str = "what do you see", *images: bytes) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_uri(im)}} for im in images]
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


# A greedy request that runs ~750 tokens on the tiny LLaVA before its EOS (found by search): long enough
# to be cancelled mid-way.
LONG_IMAGE_COLOUR = (80, 100, 140)
LONG_PROMPT = "Please describe this image in detail."


def long_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), LONG_IMAGE_COLOUR).save(buf, "PNG")
    return buf.getvalue()


# --- the vLLM engine's mixed batch (tests/server/engines) ------------------------------------------------------

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

    eos = getattr(engine, "_eos", set())

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


# --- the vLLM plugin's unit tests (tests/models/vllm_plugin) ---------------------------------------------------
# A logits processor on a small LLaVA config and rows added to it, which fills the worker state
# (models/vllm_plugin/state.py) as vLLM's batch updates would. vLLM is imported only when these are called.

PLUGIN_IMAGE = 5
PLUGIN_EOS = 2


def processor(layers: int = 4, model_dir: Path | None = None) -> SeviLogitsProcessor:
    """The logits processor as vLLM's worker builds it; `model_dir` is the served folder (its presets file)."""
    from types import SimpleNamespace

    import torch
    from transformers import LlavaConfig

    from models.vllm_plugin.logits_processor import SeviLogitsProcessor

    cfg = LlavaConfig(image_token_index=PLUGIN_IMAGE)
    text: Any = cfg.text_config  # a config object once built (typed as a union with its dict form)
    text.num_hidden_layers = layers
    text.eos_token_id = PLUGIN_EOS
    return SeviLogitsProcessor(
        SimpleNamespace(  # type: ignore[arg-type]
            model_config=SimpleNamespace(hf_config=cfg, model=str(model_dir or "tiny-llava/not-a-folder"))
        ),
        torch.device("cpu"),
        False,
    )


def add_rows(
    proc: SeviLogitsProcessor, rows: list[tuple[int, dict[str, object] | None, list[int], list[int]]], size: int
) -> None:
    """Rows (batch index, SEVI extra args or None, prompt ids, output ids so far) joining a batch of `size`."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    added = [(i, VllmSamplingParams(temperature=0.0, extra_args=extra), prompt, out) for i, extra, prompt, out in rows]
    proc.update_state(BatchUpdate(batch_size=size, removed=[], added=added, moved=[]))


def random_cpu_cache(
    n_blocks: int, heads: int, bs: int, hd: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, bool, bool]:
    """A CPU cache filled through the kernel's own writer (every slot), and its probed K/V layout."""
    from vllm import _custom_ops as ops

    from models.vllm_plugin.cpu_backend import cache_layout

    gen = torch.Generator().manual_seed(seed)
    cache = torch.zeros(n_blocks, heads, bs, 2 * hd, dtype=dtype)
    kc, vc = cache.view(n_blocks, heads, 2 * bs, hd).chunk(2, dim=2)
    n = n_blocks * bs
    k, v = torch.randn(n, heads, hd, generator=gen).to(dtype), torch.randn(n, heads, hd, generator=gen).to(dtype)
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, torch.arange(n, dtype=torch.long), "vec")
    k_t, v_t = cache_layout("vec", dtype, bs, hd)
    return cache, k_t, v_t


@functools.lru_cache(maxsize=1)
def avx2_kernel() -> Any:
    from models.kernels.paged_kv import flags_for, load

    flags = flags_for("AVX2")
    assert flags is not None
    return load(flags)


def use_kernel(build: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make paged_read.py read K/V with the C kernel as built for this CPU ("native") or for AVX2 ("avx2": its own
    tile width, 8 floats, not AVX-512's 16; where the CPU has AVX2)."""
    import models.vllm_plugin.paged_read as paged_read

    if build == "avx2":
        if not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
            pytest.skip("this CPU has no AVX2")
        assert avx2_kernel() is not None, "the AVX2 kernel did not build here"
        monkeypatch.setattr(paged_read, "kernel", avx2_kernel)
    else:
        assert paged_read.kernel() is not None, "the C kernel did not build here"


# ---- knob presets files (models/knob.py) ----


def presets_doc(**overrides: Any) -> dict[str, Any]:
    """A valid presets document (balanced at c = 0.4), with `overrides` applied."""
    doc: dict[str, Any] = {
        "format": 1,
        "balanced": 0.4,
        "focused": 1.0,
        "contrast": True,
        "knots": [
            {"c": 0.0, "omega": 0.0, "start_layer": 3, "kappa": 0.2},
            {"c": 0.4, "omega": 1.0, "start_layer": 3, "kappa": 0.2},
            {"c": 1.0, "omega": 3.0, "start_layer": 0, "kappa": 0.5, "measured": {"chair_s": 0.4}},
        ],
    }
    doc.update(overrides)
    return doc


def model_folder(tmp_path: Path, layers: int = 4, presets: dict[str, Any] | str | None = None) -> Path:
    """A model folder with just a config.json of `layers` decoder layers and, if given, a presets file."""
    from models.knob import PRESETS_FILE

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llava", "text_config": {"num_hidden_layers": layers}})
    )
    if presets is not None:
        text = presets if isinstance(presets, str) else json.dumps(presets)
        (tmp_path / PRESETS_FILE).write_text(text)
    return tmp_path


# --- a load of requests in flight when something dies or stops (tests of engine death and shutdown) -----------


def long_request(stream: bool, max_tokens: int = 900) -> dict[str, Any]:
    """A chat body that runs for hundreds of greedy tokens on the tiny LLaVA (see long_png)."""
    body: dict[str, Any] = {
        "messages": image_message(LONG_PROMPT, long_png()),
        "max_tokens": max_tokens,
        "conservativeness": 0,
    }
    return {**body, "stream": True} if stream else body


class RequestOutcome:
    """How one request of a RequestLoad ended: status, the parsed SSE events (streams) or the JSON body, whether
    the stream ended with [DONE], and the client's own error (a timeout: the request hung)."""

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.status = 0
        self.events: list[dict[str, Any]] = []
        self.done = False
        self.body: dict[str, Any] | None = None
        self.client_error: str | None = None
        self.ended_at: float | None = None  # time.monotonic() when the client saw the request end
        self.first_token = threading.Event()

    @property
    def finish_reasons(self) -> list[str]:
        """Every finish_reason this request reported (stream events, or the body's choices)."""
        payloads = [*self.events, *([self.body] if self.body is not None else [])]
        return [c["finish_reason"] for e in payloads for c in e.get("choices", []) if c.get("finish_reason")]

    @property
    def error(self) -> dict[str, Any] | None:
        """The API error this request ended with (in-band for a stream), if any."""
        for e in self.events:
            if "error" in e:
                return dict(e["error"])
        if self.body is not None and "error" in self.body:
            return dict(self.body["error"])
        return None


class RequestLoad:
    """`streams` streamed and `unstreamed` plain chat requests sent at once from threads, each with a bounded client
    timeout, so that a request left hanging shows as a client error instead of hanging the test."""

    def __init__(
        self, url: str, streams: int, unstreamed: int, timeout: float = 120, body: Callable[[bool], Any] | None = None
    ) -> None:
        self.url = url
        self.timeout = timeout
        make = body or long_request
        self.outcomes = [RequestOutcome(True) for _ in range(streams)] + [
            RequestOutcome(False) for _ in range(unstreamed)
        ]
        self.threads = [
            threading.Thread(target=self._run, args=(o, make(o.stream)), daemon=True) for o in self.outcomes
        ]
        for t in self.threads:
            t.start()

    def _run(self, outcome: RequestOutcome, body: dict[str, Any]) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=self.timeout) as c:
                if not outcome.stream:
                    r = c.post("/v1/chat/completions", json=body)
                    outcome.status, outcome.body = r.status_code, r.json()
                    return
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    outcome.status = r.status_code
                    if r.status_code != 200:
                        outcome.body = json.loads(r.read())
                        return
                    for line in r.iter_lines():
                        if line == "data: [DONE]":
                            outcome.done = True
                        elif line.startswith("data: "):
                            event = json.loads(line[6:])
                            outcome.events.append(event)
                            if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                                outcome.first_token.set()
        except Exception as exc:  # noqa: BLE001 - recorded and asserted on by the test
            outcome.client_error = f"{type(exc).__name__}: {exc}"
        finally:
            outcome.ended_at = time.monotonic()
            outcome.first_token.set()

    def wait_streaming(self, timeout: float) -> None:
        """Until every stream has had a token (unstreamed requests were sent with them)."""
        deadline = time.monotonic() + timeout
        for o in self.outcomes:
            if o.stream:
                assert o.first_token.wait(max(0.0, deadline - time.monotonic())), "a stream had no token in time"
                assert o.client_error is None and o.status == 200, (o.status, o.body, o.client_error)

    def join(self, timeout: float) -> list[RequestOutcome]:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hanging = sum(t.is_alive() for t in self.threads)
        assert hanging == 0, f"{hanging} requests still hanging {timeout} s after the fault"
        return self.outcomes


def assert_ended_by_engine_death(outcomes: list[RequestOutcome], fault_at: float | None = None) -> None:
    """Every request in flight at the fault ended with the engine's death: a stream with an in-band error event then
    [DONE] and no finish_reason (a truncation never passes for stop / length), an unstreamed request with a 503
    `engine_dead`. fault_at (time.monotonic()): requests that ended normally before it were not in flight and are
    left out (a fast worker may finish some before a test's kill lands), but at least half must have been."""
    if fault_at is not None:
        before = [o for o in outcomes if o.ended_at is not None and o.ended_at < fault_at and o.error is None]
        outcomes = [o for o in outcomes if o not in before]
        assert len(outcomes) >= len(before), f"{len(before)} of {len(outcomes) + len(before)} ended before the fault"
    for o in outcomes:
        assert o.client_error is None, o.client_error
        error = o.error
        assert error is not None and error["code"] == "engine_dead", (o.status, o.events[-2:], o.body)
        if o.stream:
            assert o.status == 200 and o.done, (o.status, o.done)
            assert "error" in o.events[-1], o.events[-1]  # the error is the last event before [DONE]
            assert o.finish_reasons == [], o.finish_reasons
        else:
            assert o.status == 503, (o.status, o.body)


def eventually(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> float | None:
    """Seconds until `predicate()` held (HTTP errors count as not yet), or None if it did not within `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if predicate():
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    return None
