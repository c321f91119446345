"""Where the CPU code built at run time is kept (the paged K/V kernel, the compiled operator), and how a
file gets there.

One folder, `SEVI_KERNEL_CACHE` (`--kernels.kernel-cache`; default `~/.cache/sevi-serve`); each file is named
by a digest of what it was built from, so a stale file is never reused and machines sharing the folder coexist.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from sevi.runtime import runtime_env


def cached_file(name: str, build: Callable[[Path], None]) -> Path:
    """The cached file `name`, made first by `build(path)` when it is not there yet. Built aside and
    renamed into place, so processes building the same file at once never see a partial one."""
    folder = runtime_env.current().kernel_cache
    target = folder / name
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            built = Path(tmp) / name
            build(built)
            os.replace(built, target)
    return target
