"""The engine tests: both engines (reference and vLLM, thread and process engine cores) checked against each other,
in the test process or as `python -m server` processes.

They run with the torch threads each engine sets for itself: no thread pin here (the HTTP tests' one-thread pin,
`one_torch_thread`, belongs to tests/server and does not reach this folder). Fixtures are the root conftest's
(`tiny_model_dir`, `tiny_model`) and each module's own; the one below only puts the process back as it found it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def process_state_restored_after_engines() -> Iterator[None]:
    """An engine loaded in this process changes it for the test packages after this one: its load exports vLLM's
    and the kernels' variables (sevi/runtime/runtime_env.py), sets torch's thread count, and vLLM's CPU worker replaces
    `torch.set_num_threads` by a stub. All three are put back once this folder's tests are done."""
    environ = os.environ.copy()
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    yield
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads = set_num_threads  # type: ignore[assignment]
    torch.set_num_threads(threads)
