"""A bounded schemathesis run against the live server's /openapi.json: whatever it sends, never a 500."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error

from tests.support.live_server import LiveServer, base_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fuzz_server(llava_dir: Path) -> Iterator[LiveServer]:
    # Short generations only: a fuzzer's max_tokens beyond 16 is refused (400) rather than run.
    live = LiveServer(base_settings(llava_dir, max_tokens_limit=16, default_max_tokens=4, request_timeout_s=20)).start()
    yield live
    live.stop()


def test_no_server_errors(fuzz_server: LiveServer) -> None:
    """Every operation, positive and negative data (schemathesis' defaults), 30 examples each, bounded in time.

    Driven through hypothesis directly: schemathesis' pytest plugin does not load under this pytest.
    """
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/caption", "/v1/chat/completions", "/v1/models", "/health"}
    seen: dict[str, int] = {}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=30,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        def run(case: Any) -> None:
            seen[case.operation.label] = seen.get(case.operation.label, 0) + 1
            case.call_and_validate(checks=[not_a_server_error], timeout=30)

        run()
    assert len(seen) == len(operations)
    assert seen["POST /caption"] >= 20 and seen["POST /v1/chat/completions"] >= 20


def test_the_fuzzer_caused_no_500s(fuzz_server: LiveServer) -> None:
    """Belt and braces: the server's own count of 500s over the whole fuzz run (also errors the check missed)."""
    text = fuzz_server.client().get("/metrics").text
    fives = [line for line in text.splitlines() if line.startswith("sevi_requests_total") and 'status="500"' in line]
    assert fives == []
    assert fuzz_server.client().get("/health").status_code == 200
