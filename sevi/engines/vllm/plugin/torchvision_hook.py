"""Interpreter-start hook: run the torchvision shim before the first `import torchvision`, in any process.

vLLM inspects model classes in a fresh `python -m vllm.model_executor.models.registry` subprocess that
imports transformers (hence torchvision) before it loads plugins, so the general plugin alone comes
too late there. `make install` writes a `.pth` file into the venv that loads this file by path (it
imports nothing of the project, so interpreter start stays cheap) and calls :func:`install`; the
finder fires once, on the first `import torchvision`, imports `sevi` (whose `__init__` defines the
two op schemas PyPI's CUDA-built torchvision expects) and then steps aside. Stdlib only, on purpose.
"""

from __future__ import annotations

import contextlib
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from typing import Any


class _TorchvisionShimFinder(MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        # Never break an unrelated interpreter: on failure torchvision fails as it would have anyway.
        with contextlib.suppress(Exception):
            import sevi  # noqa: F401  - sevi/__init__.py runs ensure_torchvision_importable()
        return None  # the normal finders import torchvision itself


def install() -> None:
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionShimFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionShimFinder())


PTH_NAME = "zz_sevi_torchvision.pth"  # "zz": after the editable-install .pth files that put `sevi` on the path


def write_pth() -> str:
    """Write the .pth file into this interpreter's site-packages (run by `make install`); returns its path."""
    import sysconfig
    from pathlib import Path

    here = Path(__file__).resolve()
    line = (
        f"import importlib.util as _u; _s = _u.spec_from_file_location('_sevi_torchvision_hook', {str(here)!r}); "
        "_m = _u.module_from_spec(_s); _s.loader.exec_module(_m); _m.install()\n"
    )
    target = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    target.write_text(line)
    return str(target)


if __name__ == "__main__":  # `python sevi/engines/vllm/plugin/torchvision_hook.py`: by path, no package import
    print(write_pth())
