"""Output records: what one (item, level) result looks like in the JSONL, in the two formats.

- caption records (folder and manifest inputs): `{"id", "conservativeness", "caption", "finish_reason", "usage",
  "alignment", "telemetry", "model", "request_id", "timings", "error": null}`, the fields of `POST /caption`'s answer
  plus the input's id, the level asked and the timings; a failed item: `{"id", "conservativeness", "status_code",
  "error": {"message", "type", "param", "code"}, "timings"}`, the API's error object and status.
- OpenAI batch records (OpenAI batch input), as OpenAI's Batch API and vLLM's run-batch write them:
  `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`, the body being what
  `POST /v1/chat/completions` answers (its error body for a failed request, whose error object is also in
  `error`). With `--levels`, each also names its `conservativeness`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from server.batch.config import Level
from server.errors import APIError
from server.schemas.chat import AssistantMessage, ChatCompletionResponse, Choice
from server.schemas.common import AppliedAlignment, Telemetry, Usage
from server.service import Outcome
from sevi.engines.api import GenerationRequest


@dataclass
class Timings:
    """Milliseconds: reading and decoding the image, waiting for a batch slot, in the engine, and in all; and when
    the result completed (Unix seconds)."""

    preprocess_ms: float = 0.0
    queue_ms: float = 0.0
    engine_ms: float = 0.0
    total_ms: float = 0.0
    completed_at: float = 0.0  # Unix time the result was written (rates over any part of a job)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in vars(self).items()}


def _level_field(level: Level | None) -> dict[str, Any]:
    return {} if level is None else {"conservativeness": level}


def caption_ok(
    item_id: str, level: Level | None, req: GenerationRequest, out: Outcome, model: str, timings: Timings
) -> dict[str, Any]:
    return {
        "id": item_id,
        **_level_field(level),
        "caption": out.text,
        "finish_reason": out.finish_reason,
        "usage": Usage.of(out.prompt_tokens, out.completion_tokens).model_dump(),
        "alignment": AppliedAlignment.model_validate(req.alignment).model_dump(),
        "telemetry": Telemetry.of(out.telemetry).model_dump(),
        "model": model,
        "request_id": req.request_id,
        "timings": timings.as_dict(),
        "error": None,
    }


def caption_failed(item_id: str, level: Level | None, err: APIError, timings: Timings) -> dict[str, Any]:
    return {
        "id": item_id,
        **_level_field(level),
        "status_code": err.status,
        "error": err.body()["error"],
        "timings": timings.as_dict(),
    }


def _batch_id() -> str:
    return f"batch_req_{uuid.uuid4().hex[:24]}"


def chat_ok(
    custom_id: str, level: Level | None, req: GenerationRequest, out: Outcome, model: str, timings: Timings
) -> dict[str, Any]:
    body = ChatCompletionResponse(
        id=req.request_id,
        created=int(time.time()),
        model=model,
        choices=[Choice(message=AssistantMessage(content=out.text), finish_reason=out.finish_reason)],
        usage=Usage.of(out.prompt_tokens, out.completion_tokens),
        alignment=AppliedAlignment.model_validate(req.alignment),
        telemetry=Telemetry.of(out.telemetry),
    )
    return {
        "id": _batch_id(),
        "custom_id": custom_id,
        **_level_field(level),
        "response": {"status_code": 200, "request_id": req.request_id, "body": body.model_dump(mode="json")},
        "error": None,
        "timings": timings.as_dict(),
    }


def chat_failed(custom_id: str, level: Level | None, err: APIError, timings: Timings) -> dict[str, Any]:
    return {
        "id": _batch_id(),
        "custom_id": custom_id,
        **_level_field(level),
        "response": {"status_code": err.status, "request_id": f"req-{uuid.uuid4().hex[:24]}", "body": err.body()},
        "error": err.body()["error"],
        "timings": timings.as_dict(),
    }


def failed(record: dict[str, Any]) -> bool:
    return record.get("error") is not None


def caption_of(record: dict[str, Any]) -> str | None:
    """The generated text of a successful record of either format."""
    if failed(record):
        return None
    if "response" in record:
        return str(record["response"]["body"]["choices"][0]["message"]["content"])
    return str(record.get("caption", ""))


def result_of(record: dict[str, Any]) -> dict[str, Any]:
    """The part of a successful record with `usage` and `telemetry` (the record, or its response body)."""
    return record["response"]["body"] if "response" in record else record
