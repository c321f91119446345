"""The engine integration tests run with torch's own thread count, as they did before they sat under tests/server.

tests/server/conftest.py pins torch to one thread for the HTTP tests (package-scoped, autouse); this fixture of the
same name overrides it here, so the engines are checked with the threads they set themselves. (pytest runs this
folder before the HTTP modules beside it, so the one-thread pin is not yet active when these run.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    yield
