"""What of OpenAI's chat API the server cannot honour: each such field is refused with a 400 that names it.

A client that asks for tools, JSON mode, logprobs or audio and gets plain text back would not know; a
refusal tells it. The request schema (`server.schemas.chat.ChatCompletionRequest`) declares every OpenAI
field, so these arrive typed; the fields it does not list here are honoured, or are hints that never
change the output (`user`, `metadata`, the prompt-cache fields).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.errors import APIError
from server.schemas.chat import ChatCompletionRequest
from server.schemas.vllm_extensions import REFUSED_DEFAULTS
from sevi.engines.api import SAMPLING_EXTENSIONS


@dataclass(frozen=True)
class Rule:
    field: str
    honoured: Callable[[Any], bool]  # whether the value can be served as asked
    why: str
    # "unsupported_parameter" when no value but absence is honoured; "unsupported_value" when some value is.
    code: str = "unsupported_parameter"


def _absent(value: Any) -> bool:
    return value is None


def _empty(value: Any) -> bool:
    return not value  # None, [] or {}


def _one_of(*allowed: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or value in allowed


TOOLS = "tool and function calling are not supported"

# Request fields, in the order they are checked.
RULES: tuple[Rule, ...] = (
    Rule("tools", _empty, TOOLS),
    Rule("tool_choice", _one_of("none"), TOOLS, "unsupported_value"),
    Rule("parallel_tool_calls", _absent, TOOLS),
    Rule("functions", _empty, TOOLS),
    Rule("function_call", _one_of("none"), TOOLS, "unsupported_value"),
    Rule(
        "response_format",
        _one_of({"type": "text"}),
        'only {"type": "text"} is supported (no JSON mode, no structured output)',
        "unsupported_value",
    ),
    Rule("logprobs", lambda value: not value, "logprobs are not supported", "unsupported_value"),
    Rule("top_logprobs", _absent, "logprobs are not supported"),
    Rule("logit_bias", _empty, "logit_bias is not supported"),
    Rule("audio", _absent, "audio output is not supported"),
    Rule(
        "modalities",
        lambda value: value is None or set(value) <= {"text"},
        "only text output is supported",
        "unsupported_value",
    ),
    Rule("prediction", _absent, "predicted outputs are not supported"),
    Rule("web_search_options", _absent, "web search is not supported"),
    Rule("moderation", _absent, "moderation is not supported"),
    Rule(
        "reasoning_effort",
        _one_of("none"),
        "the models do not reason before answering: only `none`",
        "unsupported_value",
    ),
    Rule("verbosity", _absent, "verbosity cannot be set"),
    Rule(
        "service_tier", _one_of("auto", "default"), "there is one service tier: `auto` / `default`", "unsupported_value"
    ),
    Rule("store", lambda value: not value, "completions are not stored", "unsupported_value"),
)


# vLLM's extensions the server has no use for: accepted at vLLM's default only (server.schemas.vllm_extensions).
def _default_only(default: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or value == default


VLLM_RULES: tuple[Rule, ...] = tuple(
    Rule(
        name,
        _default_only(default),
        f"vLLM's `{name}` is not supported (only its default, {default!r})",
        "unsupported_value" if default is not None else "unsupported_parameter",
    )
    for name, default in REFUSED_DEFAULTS.items()
)

# Fields of each message, checked as `messages.<i>.<field>`.
MESSAGE_RULES: tuple[Rule, ...] = (
    Rule("tool_calls", _empty, TOOLS),
    Rule("function_call", _absent, TOOLS),
    Rule("tool_call_id", _absent, TOOLS),
    Rule("audio", _absent, "audio in messages is not supported"),
    Rule("refusal", _absent, "refusal messages are not supported"),
)


def refuse_unsupported(body: ChatCompletionRequest, sampling_extensions: frozenset[str] = frozenset()) -> None:
    """Raise a 400 for the first field whose value the server cannot honour (request fields, vLLM's extensions,
    then messages). `sampling_extensions`: the vLLM sampling fields the engine honours (`Engine.sampling_extensions`);
    any other one given a value that is not its default is refused by name."""
    for rule in RULES + VLLM_RULES:
        if not rule.honoured(getattr(body, rule.field)):
            raise _refusal(rule, rule.field)
    for name in SAMPLING_EXTENSIONS:
        if name not in sampling_extensions and name in body.model_fields_set:
            default = type(body).model_fields[name].default
            if getattr(body, name) not in (None, default):
                raise APIError(
                    400,
                    f"{name}: vLLM's `{name}` is not supported by this engine (only its default, {default!r})",
                    param=name,
                    code="unsupported_parameter",
                )
    if body.stream_options is not None and body.stream_options.include_obfuscation:
        raise APIError(
            400,
            "stream_options.include_obfuscation: stream obfuscation is not supported",
            param="stream_options.include_obfuscation",
            code="unsupported_value",
        )
    for i, message in enumerate(body.messages):
        for rule in MESSAGE_RULES:
            if not rule.honoured(getattr(message, rule.field)):
                raise _refusal(rule, f"messages.{i}.{rule.field}")


def _refusal(rule: Rule, param: str) -> APIError:
    return APIError(400, f"{param}: {rule.why}", param=param, code=rule.code)
