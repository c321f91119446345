"""Streamed text reaches any line splitter whole: characters `str.splitlines` treats as line ends (U+2028, U+2029,
U+0085, \\x0b, \\x0c, \\x1c-\\x1e) are escaped inside the SSE JSON, so every event parses through httpx's
`aiter_lines` and through the official `openai` client, and the text adds up to what the model produced.

Before: pydantic wrote U+2028 / U+2029 / U+0085 raw, and `aiter_lines` cut such an event into two broken lines."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import BaseModel

from server.settings import Settings
from server.sse import sse
from sevi.engines.api import Engine, EngineStats, GenerationRequest, GenerationStats, TokenEvent
from tests.support.live_server import LiveServer, base_settings

SEPARATORS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"
PIECES = ["a\u2028b", "\u2029", "c\x85d", "e\x0bf\x0cg", "\x1c\x1d\x1e", "h\r\ni\nj", "end"]


class LineBreakEngine(Engine):
    """Emits PIECES as tokens, whatever the request: a model whose text holds every kind of line end."""

    _model_name = "line-breaks"

    @classmethod
    def from_settings(cls, settings: Settings) -> LineBreakEngine:
        return cls()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    @property
    def num_layers(self) -> int:
        return 4

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0)

    async def generate(
        self, request: GenerationRequest, stats: GenerationStats | None = None
    ) -> AsyncIterator[TokenEvent]:
        for i, piece in enumerate(PIECES):
            last = i == len(PIECES) - 1
            yield TokenEvent(request.request_id, i, piece, "stop" if last else None, 3, i + 1)
            await asyncio.sleep(0)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder: Path = tmp_path_factory.mktemp("no-model")
    server = LiveServer(base_settings(folder), engine=LineBreakEngine()).start()
    yield server
    server.stop()


class Delta(BaseModel):
    content: str


def test_sse_events_are_one_line_for_splitlines() -> None:
    # Typed models (pydantic writes non-ASCII raw: the chunks' path) and plain objects (json.dumps).
    for payload in (Delta(content=SEPARATORS), Delta(content="x" + SEPARATORS + "y"), {"text": SEPARATORS}):
        event = sse(payload).decode()
        lines = event.splitlines()
        assert lines == [lines[0], ""] and lines[0].startswith("data: ")
        want = payload.model_dump() if isinstance(payload, BaseModel) else payload
        assert json.loads(lines[0][6:]) == want  # the escapes read back as the same characters


BODY = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 20}


def test_every_streamed_event_parses_through_httpx_aiter_lines(live: LiveServer) -> None:
    async def read() -> list[str]:
        async with (
            httpx.AsyncClient(base_url=live.url, timeout=30) as client,
            client.stream("POST", "/v1/chat/completions", json=BODY) as r,
        ):
            assert r.status_code == 200
            return [line async for line in r.aiter_lines() if line]

    lines = asyncio.run(read())
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines), lines  # no line was cut inside an event
    events = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == "".join(PIECES)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_every_streamed_event_parses_through_the_openai_client(live: LiveServer) -> None:
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=30)
    stream = client.chat.completions.create(model="line-breaks", stream=True, **{k: BODY[k] for k in ("messages",)})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(PIECES)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
