"""`--engine vllm --vllm.engine-core thread|process` picks the engine class (nothing is loaded)."""

from __future__ import annotations

import pytest

from sevi.engines import create_engine
from tests.support.live_server import base_settings
from tests.support.repo import REPO


@pytest.mark.parametrize(("core", "cls"), [("thread", "VllmEngine"), ("process", "VllmProcessEngine")])
def test_the_engine_core_setting_picks_the_engine(core: str, cls: str) -> None:
    engine = create_engine(base_settings(REPO / "models" / "bundled", engine="vllm", vllm={"engine_core": core}))
    assert type(engine).__name__ == cls
    assert engine.sampling_extensions  # both honour vLLM's sampling extensions
