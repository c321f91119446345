"""Operations: API key, /metrics content, the per-request JSON log line, settings from flags and environment."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.__main__ import main
from server.logs import JsonFormatter
from server.settings import Settings, parse_cli
from tests.support.images import data_uri, image_message, png_bytes
from tests.support.live_server import LiveServer, base_settings
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed_server(llava_dir: Path) -> Iterator[LiveServer]:
    live = LiveServer(base_settings(llava_dir, api_key=KEY)).start()
    yield live
    live.stop()


def test_api_key(keyed_server: LiveServer) -> None:
    body = {"messages": image_message("describe", png_bytes(40)), "max_tokens": 3}
    with keyed_server.client() as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for method, path, kwargs in (
                ("POST", "/v1/chat/completions", {"json": body}),
                ("GET", "/v1/models", {}),
                ("POST", "/caption", {"json": {"image": data_uri(png_bytes(40))}}),
            ):
                r = c.request(method, path, headers=headers, **kwargs)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["type"] == "authentication_error"
        good = {"Authorization": f"Bearer {KEY}"}
        assert c.post("/v1/chat/completions", json=body, headers=good).status_code == 200
        assert (
            c.post("/caption", json={"image": data_uri(png_bytes(40)), "max_tokens": 3}, headers=good).status_code
            == 200
        )
        # Probes and scrapes stay open.
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        assert c.get("/metrics").status_code == 200
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [keyed_server.engine.model_name]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_metrics_content(server: LiveServer) -> None:
    m = server.metric
    heads = m("sevi_heads_reweighted_total")
    knob_count, knob_sum = (m("sevi_requested_conservativeness_count"), m("sevi_requested_conservativeness_sum"))
    prompt, completion = m("sevi_prompt_tokens_total"), m("sevi_completion_tokens_total")
    ttft, itl = (
        m("sevi_time_to_first_token_seconds_count", {"endpoint": "/caption"}),
        m("sevi_inter_token_latency_seconds_count"),
    )
    ok = m("sevi_requests_total", {"endpoint": "/caption", "status": "200"})
    bad = m("sevi_requests_total", {"endpoint": "/caption", "status": "400"})
    with server.client() as c:
        # These explicit parameters re-weight heads on the test model (checked through the telemetry).
        r = c.post(
            "/caption",
            json={
                "image": data_uri(png_bytes(41)),
                "prompt": "what do you see",
                "max_tokens": 6,
                "conservativeness": 0.75,
                "omega": 4.0,
                "start_layer": 0,
                "kappa": 0.9,
            },
        )
        assert c.post("/caption", json={"image": data_uri(png_bytes(41)), "conservativeness": 9}).status_code == 400
        text = c.get("/metrics").text
    body = r.json()
    assert r.status_code == 200
    assert body["telemetry"]["heads_reweighted"] > 0
    assert m("sevi_heads_reweighted_total") == heads + body["telemetry"]["heads_reweighted"]
    assert m("sevi_requested_conservativeness_count") == knob_count + 1
    assert m("sevi_requested_conservativeness_sum") == pytest.approx(knob_sum + 0.75)
    assert m("sevi_prompt_tokens_total") == prompt + body["usage"]["prompt_tokens"]
    assert m("sevi_completion_tokens_total") == completion + body["usage"]["completion_tokens"]
    assert m("sevi_time_to_first_token_seconds_count", {"endpoint": "/caption"}) == ttft + 1
    assert m("sevi_inter_token_latency_seconds_count") == itl + body["usage"]["completion_tokens"] - 1
    assert m("sevi_requests_total", {"endpoint": "/caption", "status": "200"}) == ok + 1
    assert m("sevi_requests_total", {"endpoint": "/caption", "status": "400"}) == bad + 1
    for name in (
        "sevi_request_latency_seconds_bucket",
        "sevi_queue_depth",
        "sevi_running_requests",
        "sevi_engine_cancelled_requests_total",
        "sevi_engine_failed_batches_total",
    ):
        assert name in text, name
    assert m("sevi_queue_depth") == 0 and m("sevi_running_requests") == 0
    # Unknown paths share one label, so scanners cannot grow the label set.
    httpx.get(server.url + "/random/path/1")
    assert m("sevi_requests_total", {"endpoint": "other", "status": "404"}) >= 1
    assert "/random/path/1" not in httpx.get(server.url + "/metrics").text


def test_one_json_log_line_per_request_without_image_bytes(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    png = png_bytes(42)

    def lines_of(rid: str) -> list[logging.LogRecord]:
        return [rec for rec in caplog.records if getattr(rec, "fields", {}).get("id") == rid]

    with caplog.at_level(logging.INFO, logger="sevi.server.access"), server.client() as c:
        r = c.post("/caption", json={"image": data_uri(png), "max_tokens": 4, "conservativeness": 0.25})
        bad = c.post("/caption", json={"image": data_uri(png), "max_tokens": -1})
        ids = (r.headers["x-request-id"], bad.headers["x-request-id"])
        # A line is written once its response has gone out, so it may trail the client by a moment.
        eventually(lambda: all(lines_of(rid) for rid in ids), 5, what="an access log line for each request")
    records = {rid: lines_of(rid) for rid in ids}
    assert [len(recs) for recs in records.values()] == [1, 1]
    ok_line = json.loads(JsonFormatter().format(records[ids[0]][0]))
    assert ok_line["endpoint"] == "/caption" and ok_line["status"] == 200 and ok_line["latency_ms"] > 0
    assert ok_line["conservativeness"] == 0.25
    assert ok_line["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert ok_line["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    bad_line = json.loads(JsonFormatter().format(records[ids[1]][0]))
    assert bad_line["status"] == 400 and "max_tokens" in bad_line["error"]
    b64 = data_uri(png).split(",", 1)[1]
    assert not any(b64[:40] in rec.getMessage() or b64[:40] in JsonFormatter().format(rec) for rec in caplog.records)


def test_settings_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEVI_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("SEVI_PORT", "9001")
    monkeypatch.setenv("SEVI_ALLOWED_IMAGE_HOSTS", "a.example, b.example:8080")
    monkeypatch.setenv("SEVI_API_KEY", "env-key-42")
    s = parse_cli(
        [
            "--model",
            "/m",
            "--port",
            "9002",
            "--default-conservativeness",
            "0.25",
            "--engine",
            "transformers",
            "--max-queue",
            "5",
        ]
    )
    assert s.max_batch_size == 3  # from the environment
    assert s.port == 9002  # the flag wins over the environment
    assert s.model == Path("/m") and s.default_conservativeness == 0.25 and s.max_queue == 5
    assert s.allowed_image_hosts == ["a.example", "b.example:8080"]
    assert s.api_key is not None and s.api_key.get_secret_value() == "env-key-42"
    assert "env-key-42" not in repr(s)


def test_cli_refuses_bad_settings_a_missing_model_or_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--default-conservativeness", "3"]) == 2
    assert "default_conservativeness" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nothing")]) == 2
    assert "not a model folder" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["--model", str(tmp_path), "--engine", "warp-drive"]) == 2
    assert "unknown engine" in capsys.readouterr().err


def test_unloadable_model_reports_through_probes(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")  # looks like a model folder, is not one
    live = LiveServer(Settings(model=tmp_path))
    live.thread.start()
    try:
        eventually(
            lambda: httpx.get(live.url + "/health").status_code == 503, 20, what="/health to answer 503 (no model)"
        )
        assert httpx.get(live.url + "/ready").status_code == 503
        r = httpx.post(live.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
    finally:
        live.stop()


def test_load_bench_smoke(server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.load import main as bench_main

    out = tmp_path / "levels.json"
    assert (
        bench_main(
            [
                "--url",
                server.url,
                "--concurrency",
                "1,3",
                "--requests",
                "6",
                "--seconds",
                "30",
                "--max-tokens",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    levels = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in levels] == [1, 3]
    for lv in levels:
        assert lv["requests"] == 6 and lv["errors"] == {}
        assert lv["requests_per_s"] > 0 and lv["tokens_per_s"] > 0
        assert 0 < lv["engine_p50_ms"] < lv["latency_p50_ms"]
    assert "overhead p50 over the engine time" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_main(["--url", "http://example.com:8000"])  # loopback only


def test_auto_engine_prefers_vllm_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from sevi.engines import resolve_engine_name

    assert resolve_engine_name("transformers") == "transformers"
    assert resolve_engine_name("vllm") == "vllm"
    have_vllm = importlib.util.find_spec("vllm") is not None
    assert resolve_engine_name("auto") == ("vllm" if have_vllm else "transformers")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    assert resolve_engine_name("auto") == "transformers"  # the fallback where vLLM is not installed
