"""The torchvision shim (sevi/runtime/torchvision_compat.py): torchvision imports in either order beside the project's
modules, and the shim never defines a schema that torchvision's own library defines.

Each case runs in a fresh interpreter: op schemas, once defined, live as long as the process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.support.repo import REPO

pytest.importorskip("torchvision")

HOOK = REPO / "sevi" / "engines" / "vllm" / "plugin" / "torchvision_hook.py"


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )


def _library_loads_here() -> bool:
    """Whether this venv's torchvision library loads against its torch (False on the CPU venv: a CUDA wheel)."""
    done = _python(
        """
        from sevi.runtime.torchvision_compat import torchvision_ops_load
        print(torchvision_ops_load())
        """
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().endswith("True")


def test_torchvision_imports_after_the_project_modules() -> None:
    done = _python(
        """
        import sevi, sevi.kernels.choice, sevi.engines.vllm.plugin.plan  # what a worker imports first
        from sevi.runtime.torchvision_compat import shim_defined_schemas
        import torchvision
        from torchvision.transforms import functional  # what the image processors use
        print("shim", shim_defined_schemas())
        """
    )
    assert done.returncode == 0, done.stderr
    # The shim's schemas exactly where torchvision's own library does not load.
    assert done.stdout.strip().endswith(f"shim {not _library_loads_here()}")


def test_torchvision_imported_first_through_the_interpreter_hook() -> None:
    """vLLM's model-inspection subprocess: torchvision first (the .pth hook runs the shim), the project after."""
    done = _python(
        f"""
        import importlib.util as u, sys
        s = u.spec_from_file_location("_hook_under_test", {str(HOOK)!r})
        m = u.module_from_spec(s); s.loader.exec_module(m); m.install()
        assert "sevi" not in sys.modules
        import torchvision
        from torchvision.transforms import functional
        import sevi
        from sevi.runtime.torchvision_compat import ensure_torchvision_importable
        ensure_torchvision_importable()  # again, after torchvision: nothing to do, nothing raised
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


# torchvision's library as a matching build behaves: loading it defines the schemas (its C++
# TORCH_LIBRARY_FRAGMENT), and loading the same file again is a no-op (dlopen).
_MATCHING_LIBRARY = """
import torch, torch.library
_loaded, _libs = set(), []
def load_library(path):
    if path in _loaded:
        return
    _loaded.add(path)
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _libs.append(lib)
torch.ops.load_library = load_library
"""


def test_a_matching_torchvision_library_is_left_to_define_its_schemas() -> None:
    """The review's failure: the shim defined nms first and the real library's load then raised "Tried to
    register an operator ... multiple times". Now the library is tried first and the shim defines nothing."""
    done = _python(
        _MATCHING_LIBRARY
        + """
from sevi.runtime.torchvision_compat import _extension_path, ensure_torchvision_importable, shim_defined_schemas
ensure_torchvision_importable()
torch.ops.load_library(str(_extension_path()))  # what torchvision's extension.py does next
torch.ops.torchvision.nms
print("shim", shim_defined_schemas())
"""
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("shim False")


def test_nothing_is_defined_on_a_gpu_build_of_torch() -> None:
    done = _python(
        """
        import torch
        torch.version.cuda = "12.8"  # as on a VLLM=gpu install
        calls = []
        torch.ops.load_library = lambda path: calls.append(path)
        from sevi.runtime.torchvision_compat import shim_defined_schemas
        print("shim", shim_defined_schemas(), "loads", len(calls))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("shim False loads 0")
