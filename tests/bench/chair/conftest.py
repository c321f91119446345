"""A live server on the tiny LLaVA for `python -m bench.chair run / calibrate` (package-scoped, one torch thread as
the HTTP tests have)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.support.live_server import LiveServer, base_settings


@pytest.fixture(scope="package")
def server(tiny_model_dir: Callable[[str], Path]) -> Iterator[LiveServer]:
    # The test machine is shared: with several intra-op threads a busy CPU makes the tiny model ~15x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    live = LiveServer(base_settings(tiny_model_dir("llava"))).start()
    yield live
    live.stop()
    torch.set_num_threads(before)
