"""The HTTP schemas against what they mirror: the installed `openai` client's chat parameters, and the engines'
telemetry (`sevi.method.telemetry.Telemetry`)."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

import pytest
from openai.types.chat import completion_create_params

from server.chat_support import MESSAGE_RULES, RULES, VLLM_RULES
from server.schemas.chat import ChatCompletionChunk, ChatCompletionRequest, ChatMessage, ChunkChoice, ChunkDelta
from server.schemas.common import AppliedAlignment, Telemetry, Usage
from server.schemas.vllm_extensions import VllmChatExtensions
from server.sse import sse
from sevi.engines.api import SAMPLING_EXTENSIONS
from sevi.method.telemetry import Telemetry as EngineTelemetry

SEVI_FIELDS = {"conservativeness", "alignment"}
# Honoured as OpenAI defines them (both engines), or hints that never change the output.
HONOURED = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
}
NO_EFFECT = {
    "user",
    "safety_identifier",
    "metadata",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
}


def openai_chat_fields() -> set[str]:
    base = completion_create_params.CompletionCreateParamsBase
    streaming = completion_create_params.CompletionCreateParamsStreaming
    return set(base.__required_keys__ | base.__optional_keys__ | streaming.__required_keys__)


def test_the_chat_request_declares_every_openai_field_and_no_other() -> None:
    declared = set(ChatCompletionRequest.model_fields)
    assert openai_chat_fields() - declared == set(), "OpenAI fields the schema does not know (they would be 400s)"
    assert declared - openai_chat_fields() == SEVI_FIELDS | set(VllmChatExtensions.model_fields)


def test_every_vllm_extension_is_honoured_refused_or_a_hint() -> None:
    """vLLM's extra chat fields: the sampling ones honoured (by an engine that says so), the others refused unless at
    vLLM's default, or hints without effect; none overlaps an OpenAI field, none falls through."""
    vllm_fields = set(VllmChatExtensions.model_fields)
    refused = {rule.field for rule in VLLM_RULES}
    hints = {"include_reasoning", "request_id", "session_id", "cache_salt"}
    assert set(SAMPLING_EXTENSIONS) | refused | hints == vllm_fields
    assert not (set(SAMPLING_EXTENSIONS) & refused) and not (hints & refused)
    assert not vllm_fields & openai_chat_fields()


def test_the_vllm_extensions_cover_vllms_own_request() -> None:
    """Every field of the installed vLLM's ChatCompletionRequest that OpenAI lacks is declared here (so what a
    `vllm serve` client sends is honoured or refused by name, never a generic 400), deprecated aliases aside."""
    protocol = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    theirs = set(protocol.ChatCompletionRequest.model_fields) - openai_chat_fields() - {"return_mm_kwargs"}
    assert theirs - set(ChatCompletionRequest.model_fields) == set()


def test_every_openai_field_is_honoured_or_refused() -> None:
    """No field falls through: each is honoured, has no effect by nature, or has a refusal rule (which may accept
    some values, e.g. `response_format` text)."""
    refused = {rule.field for rule in RULES}
    assert len(refused) == len(RULES)
    assert HONOURED | NO_EFFECT | refused == openai_chat_fields()
    assert not (HONOURED | NO_EFFECT) & refused


def test_every_openai_message_field_is_declared() -> None:
    message_fields: set[str] = set()
    for member in typing.get_args(completion_create_params.ChatCompletionMessageParam):
        message_fields |= set(member.__required_keys__ | member.__optional_keys__)
    assert message_fields <= set(ChatMessage.model_fields)
    refused = {rule.field for rule in MESSAGE_RULES}
    assert set(ChatMessage.model_fields) == {"role", "content", "name"} | refused


def test_the_telemetry_schema_mirrors_the_engines_telemetry() -> None:
    engine = [(f.name, f.type) for f in dataclasses.fields(EngineTelemetry)]
    schema = [(name, info.annotation) for name, info in Telemetry.model_fields.items()]
    assert [name for name, _ in schema] == [name for name, _ in engine]
    assert all(t is int for _, t in schema) and all(t in (int, "int") for _, t in engine)
    # Distinct values in every field: a field read from the wrong attribute shows up.
    values = EngineTelemetry(*range(1, len(engine) + 1))
    assert Telemetry.of(values).model_dump() == values.as_dict()
    assert Telemetry.of(None) == Telemetry()


def test_stream_chunks_carry_only_what_they_have() -> None:
    """The JSON of each kind of chunk, field for field (OpenAI's shape plus the SEVI extras where they belong)."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}
    applied = AppliedAlignment(conservativeness=0.5, omega=0.5, start_layer=2, kappa=0.2, contrast=True)

    def event(**fields: Any) -> dict[str, Any]:
        data = sse(ChatCompletionChunk(id="chatcmpl-1", created=7, model="m", **fields))
        assert data.startswith(b"data: ") and data.endswith(b"\n\n")
        return dict(json.loads(data[6:]))

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

    first = event(choices=[ChunkChoice(delta=ChunkDelta(role="assistant", content=""))], alignment=applied)
    assert first == {
        **head,
        "choices": [choice({"role": "assistant", "content": ""})],
        "alignment": applied.model_dump(),
    }
    text = event(choices=[ChunkChoice(delta=ChunkDelta(content="a"))])
    assert text == {**head, "choices": [choice({"content": "a"})]}
    last = event(
        choices=[ChunkChoice(delta=ChunkDelta(), finish_reason="stop")],
        alignment=applied,
        telemetry=Telemetry(aligned_rows=3),
    )
    assert last == {
        **head,
        "choices": [choice({}, "stop")],
        "alignment": applied.model_dump(),
        "telemetry": Telemetry(aligned_rows=3).model_dump(),
    }
    usage = event(choices=[], usage=Usage.of(5, 2))
    assert usage == {**head, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
