"""Fixtures of the vLLM plugin's unit tests: an empty worker state, and each way the aligned rows read K/V."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.vllm_plugin import use_kernel


@pytest.fixture
def fresh_state() -> Iterator[None]:
    """The plugin's worker state and front end's served model emptied before and after a test (the unit tests fill
    them through add_rows and front_end.configure)."""
    from sevi.engines.vllm.plugin import front_end
    from sevi.engines.vllm.plugin.state import STATE

    STATE.reset()
    front_end.reset()
    yield
    STATE.reset()
    front_end.reset()


@pytest.fixture(params=["native", "avx2"])
def kernel_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The C kernel, both builds (see use_kernel)."""
    use_kernel(str(request.param), monkeypatch)
    return str(request.param)


@pytest.fixture(params=["kernel", "kernel-avx2", "torch"])
def kv_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every way the aligned rows read K/V: the C kernel in place (both builds) and the torch gather + bmm."""
    import sevi.engines.vllm.plugin.paged_read as paged_read

    if request.param == "torch":
        monkeypatch.setattr(paged_read, "kernel", lambda: None)
    else:
        use_kernel("avx2" if request.param == "kernel-avx2" else "native", monkeypatch)
    return str(request.param)
