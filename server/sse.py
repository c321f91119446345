"""Server-sent events for streaming responses."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def sse(payload: dict[str, Any] | BaseModel) -> bytes:
    """One `data:` event: a typed model as its JSON (fields it leaves out stay out), or a plain JSON object."""
    if isinstance(payload, BaseModel):
        return b"data: " + payload.model_dump_json().encode() + b"\n\n"
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class EventStream(StreamingResponse):
    """An SSE response that always closes its iterator, even when the client left mid-send.

    Starlette stops iterating when the client disconnects but leaves the generator to the garbage
    collector; closing it here runs its `finally` at once, which cancels the generation in the engine.
    """

    media_type = "text/event-stream"

    def __init__(self, content: Any) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
