"""OpenAI chat fields through the official `openai` client: the penalties are honoured (the server's output is the
reference model's with the same penalties), what cannot be honoured is refused with a 400 naming the field, and
the hints that never change the output are accepted."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from sevi.engines.api import GenerationRequest, SamplingParams, user_message
from sevi.engines.reference.generation import ReferenceModel, run_to_completion
from sevi.method.knob import resolve_alignment
from tests.support.images import image_message, png_bytes
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.integration

PNG = png_bytes(20)  # an image where each penalty changes the tiny model's words, contrasted or not
PROMPT = "what do you see"
MAX_TOKENS = 24


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _create(server: LiveServer, **kwargs: Any) -> Any:
    body: dict[str, Any] = {
        "model": server.engine.model_name,
        "messages": image_message(PROMPT, PNG),
        "max_tokens": MAX_TOKENS,
        **kwargs,
    }
    return _client(server).chat.completions.create(**body)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
ASSISTANT_TOOL_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
}

REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    ("tools", {"tools": [TOOL]}, "tools", "unsupported_parameter"),
    ("tool_choice auto", {"tool_choice": "auto"}, "tool_choice", "unsupported_value"),
    ("parallel_tool_calls", {"parallel_tool_calls": True}, "parallel_tool_calls", "unsupported_parameter"),
    ("functions", {"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ("function_call auto", {"function_call": "auto"}, "function_call", "unsupported_value"),
    ("json mode", {"response_format": {"type": "json_object"}}, "response_format", "unsupported_value"),
    (
        "json schema",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
        "response_format",
        "unsupported_value",
    ),
    ("logprobs", {"logprobs": True}, "logprobs", "unsupported_value"),
    ("top_logprobs", {"top_logprobs": 2}, "top_logprobs", "unsupported_parameter"),
    ("logit_bias", {"logit_bias": {"5": 10}}, "logit_bias", "unsupported_parameter"),
    ("audio output", {"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_parameter"),
    ("audio modality", {"modalities": ["text", "audio"]}, "modalities", "unsupported_value"),
    ("prediction", {"prediction": {"type": "content", "content": "x"}}, "prediction", "unsupported_parameter"),
    ("web search", {"web_search_options": {}}, "web_search_options", "unsupported_parameter"),
    ("moderation", {"moderation": {"model": "omni-moderation-latest"}}, "moderation", "unsupported_parameter"),
    ("reasoning", {"reasoning_effort": "high"}, "reasoning_effort", "unsupported_value"),
    ("verbosity", {"verbosity": "low"}, "verbosity", "unsupported_parameter"),
    ("flex tier", {"service_tier": "flex"}, "service_tier", "unsupported_value"),
    ("store", {"store": True}, "store", "unsupported_value"),
    (
        "stream obfuscation",
        {"stream": True, "stream_options": {"include_obfuscation": True}},
        "stream_options.include_obfuscation",
        "unsupported_value",
    ),
    (
        "assistant tool call",
        {"messages": [*image_message(PROMPT, PNG), ASSISTANT_TOOL_CALL, {"role": "user", "content": "and?"}]},
        "messages.1.tool_calls",
        "unsupported_parameter",
    ),
    (
        "assistant refusal",
        {
            "messages": [
                *image_message(PROMPT, PNG),
                {"role": "assistant", "refusal": "no"},
                {"role": "user", "content": "and?"},
            ]
        },
        "messages.1.refusal",
        "unsupported_parameter",
    ),
    (
        "tool message",
        {
            "messages": [
                *image_message(PROMPT, PNG),
                ASSISTANT_TOOL_CALL,
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ]
        },
        "messages.2.role",
        "invalid_value",
    ),
    ("a field neither OpenAI nor vLLM has", {"extra_body": {"topk": 5}}, "topk", "invalid_value"),
    ("a misspelt vLLM field", {"extra_body": {"ignore_eoss": True}}, "ignore_eoss", "invalid_value"),
    ("vLLM beam search", {"extra_body": {"use_beam_search": True}}, "use_beam_search", "unsupported_value"),
    ("vLLM priority", {"extra_body": {"priority": 3}}, "priority", "unsupported_value"),
    ("vLLM bad_words", {"extra_body": {"bad_words": ["cat"]}}, "bad_words", "unsupported_parameter"),
    ("vLLM vllm_xargs", {"extra_body": {"vllm_xargs": {"k": 1}}}, "vllm_xargs", "unsupported_parameter"),
    ("vLLM top_k out of range", {"extra_body": {"top_k": -2}}, "top_k", "invalid_value"),
    ("presence_penalty out of range", {"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ("frequency_penalty out of range", {"frequency_penalty": -3}, "frequency_penalty", "invalid_value"),
]


@pytest.mark.parametrize(("case", "kwargs", "param", "code"), REFUSED, ids=[c[0] for c in REFUSED])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(
    server: LiveServer, case: str, kwargs: dict[str, Any], param: str, code: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _create(server, **kwargs)
    err = caught.value
    assert err.status_code == 400
    assert err.param == param and err.code == code, err.body
    assert param in err.message
    assert isinstance(err.body, dict) and err.body["type"] == "invalid_request_error"


def test_hints_without_effect_are_accepted_and_change_nothing(server: LiveServer) -> None:
    plain = _create(server)
    hinted = _create(
        server,
        user="u-1",
        safety_identifier="s-1",
        metadata={"team": "a"},
        prompt_cache_key="k",
        prompt_cache_retention="24h",
        extra_body={"prompt_cache_options": {"ttl": "30m"}},
        service_tier="auto",
        store=False,
        modalities=["text"],
        response_format={"type": "text"},
        tool_choice="none",
        function_call="none",
        reasoning_effort="none",
        logprobs=False,
        n=1,
        tools=[],
        logit_bias={},
    )
    assert plain.choices[0].message.content
    assert hinted.choices[0].message.content == plain.choices[0].message.content
    assert hinted.choices[0].finish_reason == plain.choices[0].finish_reason


@pytest.fixture(scope="module")
def model(llava_dir: Path) -> ReferenceModel:
    return ReferenceModel.load(llava_dir)


def _reference_text(model: ReferenceModel, conservativeness: float, **penalties: float) -> str:
    request = GenerationRequest(
        "r",
        user_message(PROMPT),
        [Image.open(io.BytesIO(PNG))],
        resolve_alignment(conservativeness, model.num_layers),
        SamplingParams(max_tokens=MAX_TOKENS, **penalties),
    )
    return run_to_completion(model, [request])["r"].text


@pytest.mark.parametrize("conservativeness", [0.0, 0.5])  # 0.5: contrastive decoding on, penalties after it
def test_penalties_are_the_reference_models(server: LiveServer, model: ReferenceModel, conservativeness: float) -> None:
    texts = {}
    for name, penalties in (
        ("none", {}),
        ("frequency", {"frequency_penalty": 2.0}),
        ("presence", {"presence_penalty": 2.0}),
        ("both", {"frequency_penalty": -2.0, "presence_penalty": 1.0}),
    ):
        got = _create(server, extra_body={"conservativeness": conservativeness}, **penalties)
        texts[name] = got.choices[0].message.content
        assert texts[name] == _reference_text(model, conservativeness, **penalties), name
    # Not vacuous: each penalty changed what the model said.
    assert texts["frequency"] != texts["none"] and texts["presence"] != texts["none"]
    streamed = _client(server).chat.completions.create(
        model=server.engine.model_name,
        messages=image_message(PROMPT, PNG),  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        stream=True,
        frequency_penalty=2.0,
        extra_body={"conservativeness": conservativeness},
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == texts["frequency"]


# vLLM's sampling extensions, each with a value that changes the tiny model's output on this image.
VLLM_EXTENSIONS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("repetition_penalty", {"repetition_penalty": 1.8}, {"repetition_penalty": 1.8}),
    ("top_k", {"temperature": 2.0, "seed": 3, "top_k": 1}, {"temperature": 2.0, "seed": 3, "top_k": 1}),
    ("min_p", {"temperature": 2.0, "seed": 3, "min_p": 0.5}, {"temperature": 2.0, "seed": 3, "min_p": 0.5}),
]


@pytest.mark.parametrize(("name", "body", "sampling"), VLLM_EXTENSIONS, ids=[c[0] for c in VLLM_EXTENSIONS])
def test_vllm_sampling_extensions_are_the_reference_models(
    server: LiveServer, model: ReferenceModel, name: str, body: dict[str, Any], sampling: dict[str, Any]
) -> None:
    """What a `vllm serve` client sends is honoured: the output is the reference model's with the same parameter, and
    (not vacuous) differs from the output without it."""
    got = _create(server, extra_body={"conservativeness": 0.0, **body}).choices[0].message.content
    assert got == _reference_text(model, 0.0, **sampling)
    without = {k: v for k, v in sampling.items() if k != name}
    assert got != _reference_text(model, 0.0, **without), f"{name} changed nothing here"


def test_ignore_eos_min_tokens_and_stop_token_ids(server: LiveServer, model: ReferenceModel) -> None:
    """vLLM's benchmark client sends `ignore_eos` for its random data: honoured, the request runs to its budget. A
    stop token id ends the request with "stop" (not in the text), and min_tokens holds it back."""
    full = _create(server, max_tokens=40, extra_body={"conservativeness": 0.0, "ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 40
    request = GenerationRequest(
        "r",
        user_message(PROMPT),
        [Image.open(io.BytesIO(PNG))],
        resolve_alignment(0.0, model.num_layers),
        SamplingParams(max_tokens=40, ignore_eos=True),
    )
    ids = run_to_completion(model, [request])["r"].token_ids
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == full.choices[0].message.content
    stop_id = ids[5]
    first = ids.index(stop_id)  # the token may have come earlier too
    stopped = _create(
        server, max_tokens=40, extra_body={"conservativeness": 0.0, "ignore_eos": True, "stop_token_ids": [stop_id]}
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == first  # the stop token is not counted, as EOS is not
    assert stopped.choices[0].message.content == model.tokenizer.decode(ids[:first], skip_special_tokens=True)
    held = _create(
        server,
        max_tokens=40,
        extra_body={"conservativeness": 0.0, "ignore_eos": True, "stop_token_ids": [stop_id], "min_tokens": first + 1},
    )
    assert held.usage.completion_tokens > first  # that occurrence was not sampled: the run went on past it
