"""Pure ASGI middleware around every HTTP request: id, body-size limit, metrics, one JSON log line.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streaming responses and hide
client disconnects from the routes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError
from server.metrics import Metrics

log = logging.getLogger("sevi.server.access")

# Metrics label by route, not raw path: random paths (scanners, fuzzers) must not grow label sets.
ENDPOINTS = frozenset({"/caption", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics"})


@dataclass
class Arrival:
    """What the middleware notes when a request arrives, handed to routes by `server.deps.ArrivalDep`: its id,
    the arrival time (deadlines and latencies count from here) and the fields routes add to its log line."""

    request_id: str
    t0: float  # time.perf_counter() at arrival
    log: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def now(cls) -> Arrival:
        return cls(f"req-{uuid.uuid4().hex[:16]}", time.perf_counter())


class RequestContext:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrival = Arrival.now()
        rid = arrival.request_id
        state = scope.setdefault("state", {})
        state["arrival"] = arrival
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message).append("x-request-id", rid)
            await send(message)

        try:
            body_receive = await self._limit_body(scope, receive)
            if body_receive is None:
                await _send_error(
                    send_with_id,
                    APIError(413, f"request body is larger than {self.max_body} bytes", code="request_too_large"),
                )
                state["error"] = "request body too large"
            else:
                await self.app(scope, body_receive, send_with_id)
        except Exception:
            status = 500
            raise
        finally:
            self._record(scope, state, arrival, status, time.perf_counter() - arrival.t0)

    async def _limit_body(self, scope: Scope, receive: Receive) -> Receive | None:
        """A receive the app may use, or None when the body is over the limit (answered 413 unread).

        With a Content-Length the check costs nothing. A chunked body is read up to the limit (never
        more is held) and replayed to the app.
        """
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                length = value
                break
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = self.max_body + 1
            return receive if declared <= self.max_body else None
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return receive
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([], message, receive)
            size += len(message.get("body", b""))
            if size > self.max_body:
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        return _replay(chunks, None, receive)

    def _record(self, scope: Scope, state: dict[str, Any], arrival: Arrival, status: int, seconds: float) -> None:
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(seconds)
        fields: dict[str, Any] = {
            "id": arrival.request_id,
            "method": scope.get("method"),
            "endpoint": path[:200],
            "status": status,
            "latency_ms": round(seconds * 1000, 3),
        }
        fields.update(arrival.log)
        if state.get("error"):
            fields["error"] = state["error"]
        if endpoint in ("/health", "/ready", "/metrics") and status == 200:
            log.debug("request", extra={"fields": fields})  # probes and scrapes would drown the log
        else:
            log.info("request", extra={"fields": fields})


def _replay(chunks: list[bytes], pending: Message | None, receive: Receive) -> Receive:
    """Hand the buffered body over once, then pass through (the app listens for the disconnect later)."""
    queue: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
    if pending is not None:
        queue = [pending]

    async def replay() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return replay


async def _send_error(send: Send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": err.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
