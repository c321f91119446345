"""The death tests' judge (tests/support/request_load.py): a complete run whose end was read after the kill is left
out, a truncation that claims `length` is not."""

from __future__ import annotations

import pytest

from tests.support.request_load import RequestOutcome, assert_ended_by_engine_death


def _stream(finish: str | None, tokens: int | None, ended_at: float, error: bool = False) -> RequestOutcome:
    o = RequestOutcome(stream=True)
    o.status, o.done, o.ended_at = 200, True, ended_at
    o.events = [{"choices": [{"delta": {"content": "x"}, "finish_reason": None}]}]
    if error:
        o.events.append({"error": {"code": "engine_dead", "message": "the engine died"}})
    else:
        o.events.append({"choices": [{"delta": {}, "finish_reason": finish}]})
    if tokens is not None:
        o.events.append({"choices": [], "usage": {"completion_tokens": tokens}})
    return o


def test_a_complete_run_read_after_the_fault_is_left_out() -> None:
    died = [_stream(None, None, ended_at=11.0, error=True) for _ in range(3)]
    assert_ended_by_engine_death([*died, _stream("length", 900, ended_at=10.2)], fault_at=10.0, max_tokens=900)


def test_a_truncation_passing_for_length_after_the_fault_fails() -> None:
    died = [_stream(None, None, ended_at=11.0, error=True) for _ in range(3)]
    with pytest.raises(AssertionError):
        assert_ended_by_engine_death([*died, _stream("length", 412, ended_at=10.2)], fault_at=10.0, max_tokens=900)


def test_without_max_tokens_only_the_clock_decides() -> None:
    died = [_stream(None, None, ended_at=11.0, error=True) for _ in range(3)]
    with pytest.raises(AssertionError):
        assert_ended_by_engine_death([*died, _stream("length", 900, ended_at=10.2)], fault_at=10.0)
