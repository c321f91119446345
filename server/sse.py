"""Server-sent events for streaming responses."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

# Characters that Python's `str.splitlines` (and so httpx's `aiter_lines`, and `httpx-sse` on it) takes for line
# ends besides \n and \r: JSON may carry them raw inside strings, which would cut an event's line in two. JSON's
# own encoders already escape the C0 ones; U+0085, U+2028 and U+2029 are what a model's text brings.
_LINE_BREAKS = {c: f"\\u{ord(c):04x}" for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}
_ESCAPE_LINE_BREAKS = str.maketrans(_LINE_BREAKS)


def sse(payload: dict[str, Any] | BaseModel) -> bytes:
    """One `data:` event: a typed model as its JSON (fields it leaves out stay out), or a plain JSON object, on one
    line for any line splitter (`_LINE_BREAKS` escaped; JSON strings read them back as the same characters)."""
    text = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload, separators=(",", ":"))
    return b"data: " + text.translate(_ESCAPE_LINE_BREAKS).encode() + b"\n\n"


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
