"""A load of requests in flight when something dies or stops (tests of engine death and shutdown): sent at once
from threads, each outcome recorded, and how every one of them must end when the engine dies."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.support.images import LONG_PROMPT, image_message, long_png


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
    def completion_tokens(self) -> int | None:
        """The usage the server reported (the body's, or a stream's usage chunk when include_usage asked for it)."""
        for payload in [*self.events, *([self.body] if self.body is not None else [])]:
            if payload.get("usage"):
                return int(payload["usage"]["completion_tokens"])
        return None

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

    # These two block on the request threads' own signals (an event, the thread's end) within one time budget: no
    # polling, so not eventually(); each says what did not happen in time.
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


def ended_before_fault(
    outcomes: list[RequestOutcome], fault_at: float, max_tokens: int | None = None
) -> list[RequestOutcome]:
    """Requests a fault at fault_at could not have ended: ended normally before it, or (with max_tokens) reported all
    max_tokens tokens with finish_reason length (a dead worker computes nothing, so those tokens came before it)."""

    def complete(o: RequestOutcome) -> bool:
        return max_tokens is not None and o.finish_reasons == ["length"] and o.completion_tokens == max_tokens

    return [
        o for o in outcomes if o.ended_at is not None and o.error is None and (o.ended_at < fault_at or complete(o))
    ]


def assert_ended_by_engine_death(
    outcomes: list[RequestOutcome], fault_at: float | None = None, max_tokens: int | None = None
) -> None:
    """Every request in flight at the fault ended with the engine's death: a stream with an in-band error event then
    [DONE] and no finish_reason (a truncation never passes for stop / length), an unstreamed request or a stream not
    yet admitted with a 503 `engine_dead`. fault_at (time.monotonic()): requests that ended normally before it were
    not in flight and are left out (a fast worker may finish some before a test's kill lands), but at least half
    must have been. With max_tokens, so is a request whose end the client read after the fault but which reported
    all max_tokens tokens and finish_reason length: a dead worker computes nothing, so its tokens were all made
    before the fault (a stream's last events can reach the client after the kill lands)."""

    if fault_at is not None:
        before = ended_before_fault(outcomes, fault_at, max_tokens)
        outcomes = [o for o in outcomes if o not in before]
        assert len(outcomes) >= len(before), (
            f"{len(before)} of {len(outcomes) + len(before)} ended before the fault: "
            + "; ".join(
                f"{o.status} {o.finish_reasons} {o.completion_tokens} tokens, {(o.ended_at or 0.0) - fault_at:+.2f} s"
                for o in before
            )
        )
    for o in outcomes:
        assert o.client_error is None, o.client_error
        error = o.error
        assert error is not None and error["code"] == "engine_dead", (o.status, o.events[-2:], o.body)
        if o.stream and o.status == 503:  # not yet admitted when the engine died: refused with engine_dead
            continue
        if o.stream:
            assert o.status == 200 and o.done, (o.status, o.done)
            assert "error" in o.events[-1], o.events[-1]  # the error is the last event before [DONE]
            assert o.finish_reasons == [], o.finish_reasons
        else:
            assert o.status == 503, (o.status, o.body)
