"""`python -m server` on the vLLM engine loses a worker process (`kill -9`) under a load of streamed and plain
requests: on two CPU workers (tensor parallel 2, vLLM's `mp` executor, one core each), and on one worker of the
`mp` executor (the engine's only worker process).

Asserted, as an operator would see it: /health answers 503 naming what died within 10 s; every request in
flight ends with `engine_dead` (a stream in-band, then [DONE], no finish_reason), none hangs; /ready is 503, a
new request gets a 503 in the API's error format, `sevi_engine_up` is 0; the process exits with status 3 after
the grace period, and its log names the worker that died.

Before (measured on TP 2, issue 27): /health and /ready stayed 200, the process stayed up, and every new request
got a 500 "Executor failed." forever.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

pytest.importorskip("vllm")

from bench.vs_vllm import Server  # noqa: E402
from server.watchdog import ENGINE_DEAD_EXIT_CODE  # noqa: E402
from tests.support.repo import REPO  # noqa: E402
from tests.support.request_load import (  # noqa: E402
    RequestLoad,
    assert_ended_by_engine_death,
    ended_before_fault,
    long_request,
)
from tests.support.waiting import eventually  # noqa: E402

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 400.0  # import vllm, start the worker processes, load: ~60-120 s on two busy cores
GRACE_S = 15.0  # the exit grace given to the server: time for the checks below to see the dead server first
STREAMS, UNSTREAMED = 4, 4
MAX_TOKENS = 900  # per request, run to the end (ignore_eos)
TTFT_COUNT = "sevi_time_to_first_token_seconds_count"


def sevi_server(model_dir: Path, log_dir: Path, workers: int, repo: Path = REPO) -> Server:
    """`python -m server` (the code in `repo`) on the vLLM engine's `mp` executor with `workers` tensor-parallel
    workers, one core each."""
    cmd = [sys.executable, "-m", "server", "--model", str(model_dir), "--engine", "vllm", "--host", "127.0.0.1",
           "--max-tokens-limit", "1000", "--request-timeout-s", "120",
           "--vllm.distributed-executor-backend", "mp", "--vllm.tensor-parallel-size", str(workers),
           "--vllm.enforce-eager", "true", "--vllm.cpu-kv-cache-gib", "1"]  # fmt: skip
    if repo == REPO:
        cmd += ["--engine-dead-exit-after-s", str(GRACE_S)]
    binding = "0|1" if workers == 2 else "0"  # vLLM's CPU workers need one core each, named
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=binding, PYTHONPATH=str(repo))
    return Server(f"sevi-tp{workers}", cmd, env, log_dir, "/ready", cwd=repo)


def worker_process(server: Server, workers: int) -> psutil.Process:
    """The vLLM worker to kill: `VLLM::Worker_TP1` on two workers, `VLLM::Worker` on one."""
    title = "VLLM::Worker_TP1" if workers == 2 else "VLLM::Worker"
    titles: list[str] = []
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            words = " ".join(child.cmdline()).split()
        except psutil.Error:  # a helper process that already exited (a zombie)
            continue
        titles.append(" ".join(words)[:60])
        if words[:1] == [title]:
            return child
    raise AssertionError(f"no {title} among {titles}")


def first_tokens_seen(server: Server) -> float:
    """Requests that had their first token, by the server's own count (`sevi_time_to_first_token_seconds_count`)."""
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(TTFT_COUNT))


def kill_a_worker_under_load(server: Server, workers: int) -> dict[str, Any]:
    """Kill the worker with requests in flight; what the server did, with timings (seconds from the kill)."""
    # ignore_eos: every request runs its 900 tokens (the tiny model's EOS once ended 7 of 8 before the kill).
    load = RequestLoad(
        server.url, streams=STREAMS, unstreamed=UNSTREAMED, timeout=120,
        body=lambda stream: {
            **long_request(stream, max_tokens=MAX_TOKENS),
            "ignore_eos": True,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        },
    )  # fmt: skip
    # Kill at the first token the server saw for any request (its time-to-first-token count), not the first text a
    # client read: the random tiny model's tokens can decode to no text for a long stretch, and waiting for a
    # stream's first text let 7 of 8 requests run to their end before the kill (on a quiet machine, CI included).
    eventually(lambda: first_tokens_seen(server) > 0, 180, what="the server's first token")
    # Kill once every stream has a token: the tiny model finishes these requests in seconds on a quiet machine (an
    # unchecked 30 s wait for a metric here once let all 8 end first). Requests that still end before the kill
    # are left out of the check (fault_at), at most half of them.
    worker = worker_process(server, workers)
    name = " ".join(worker.cmdline())  # before the kill: a killed worker is a zombie until reaped (psutil refuses)
    t0 = time.monotonic()
    os.kill(worker.pid, signal.SIGKILL)
    seen: dict[str, Any] = {"worker": name, "killed_at": t0}
    seen["health_503_after_s"] = eventually(
        lambda: httpx.get(server.url + "/health", timeout=5).status_code == 503,
        timeout_s=30,
        what="/health to answer 503 after the worker was killed",
    )
    outcomes = load.join(timeout=60)
    seen["requests_ended_after_s"] = round(time.monotonic() - t0, 2)
    seen["outcomes"] = outcomes
    with httpx.Client(base_url=server.url, timeout=10) as c:
        health, ready, metrics = c.get("/health"), c.get("/ready"), c.get("/metrics")
        new = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    seen["health"] = (health.status_code, health.json())
    seen["ready"] = (ready.status_code, ready.json())
    seen["engine_up"] = [line for line in metrics.text.splitlines() if line.startswith("sevi_engine_up")]
    seen["new_request"] = (new.status_code, new.json())
    try:
        server.proc.wait(GRACE_S + 40)
    except Exception:  # noqa: BLE001 - it did not exit: reported as None
        seen["exit"] = None
    else:
        seen["exit"] = (server.proc.returncode, round(time.monotonic() - t0, 2))
    return seen


@pytest.mark.parametrize("workers", [2, 1], ids=["tp2", "one-worker"])
def test_a_killed_worker_ends_requests_turns_probes_and_exits(
    workers: int, tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    # Up to 3 servers: where the front end lags far behind the workers (both cores bound to the two workers, a busy
    # machine) every request can have all its tokens computed before the kill, and then nothing was in flight to
    # judge; a fresh server is tried then (the judge still demands at least half in flight).
    for attempt in range(3):
        log_dir = tmp_path / f"attempt{attempt}"
        log_dir.mkdir()
        server = sevi_server(tiny_model_dir("llava"), log_dir, workers)
        try:
            server.wait_ready(START_TIMEOUT_S)
            seen = kill_a_worker_under_load(server, workers)
        finally:
            server.stop()
        before = ended_before_fault(seen["outcomes"], seen["killed_at"], MAX_TOKENS)
        if len(before) * 2 <= len(seen["outcomes"]):  # at least half in flight: what the judge demands
            break
    log = server.log_path.read_text(errors="replace")
    report = {k: v for k, v in seen.items() if k not in ("outcomes", "killed_at")}
    print(f"\nworkers={workers}: " + json.dumps(report, default=str))  # the figures of the closing note (-s)

    assert seen["health_503_after_s"] <= 10, report
    assert_ended_by_engine_death(seen["outcomes"], fault_at=seen["killed_at"], max_tokens=MAX_TOKENS)
    status, body = seen["health"]
    assert status == 503 and body["status"] == "dead" and "Worker" in body["detail"], body
    assert seen["ready"][0] == 503, seen["ready"]
    status, body = seen["new_request"]
    assert status == 503 and body["error"]["code"] == "engine_dead", body
    assert seen["engine_up"] == ["sevi_engine_up 0.0"], seen["engine_up"]
    assert seen["exit"] is not None and seen["exit"][0] == ENGINE_DEAD_EXIT_CODE, (seen["exit"], log[-3000:])
    assert GRACE_S <= seen["exit"][1] <= GRACE_S + 35, seen["exit"]
    dead_lines = [json.loads(line) for line in log.splitlines() if line.startswith("{") and '"engine dead"' in line]
    assert dead_lines and "Worker" in dead_lines[0]["cause"], log[-3000:]  # the log names what died
