"""The alignment operator compiled ahead of time for the CPU (torch.export + AOTInductor).

Why: :func:`models.alignment.align_tensors` is about 35 small tensor ops per aligned layer, and on the
CPU each op costs microseconds of Python and dispatcher work whatever its size: most of SEVI's cost on
small models. Here torch traces that very function (no second implementation of the method) with the
rows, heads and keys as dynamic sizes, and AOTInductor compiles the graph into C++ called without
Python between the ops: 46 -> 6 us at one row, 57 -> 14 us at 8 rows x 111 keys (cache-hot).

Built once per (operator source, torch version, CPU ISA) into a cache folder (`SEVI_KERNEL_CACHE`,
default `~/.cache/sevi-serve`; about 10 s, with the system C++ compiler); afterwards loading takes
milliseconds. `SEVI_COMPILED_OPERATOR=0`, or a failed build (no compiler), keeps the eager operator.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from pathlib import Path

import torch

from models import alignment
from models.build_cache import cached_file

log = logging.getLogger("sevi.alignment")

_LOCK = threading.Lock()
_MAX = 1 << 20  # bound of each dynamic size (export wants one)


class _Operator(torch.nn.Module):
    def forward(self, scores: torch.Tensor, key_bias: torch.Tensor, semantic_keys: torch.Tensor,
                other_keys: torch.Tensor, kappa: torch.Tensor, blend: torch.Tensor, on: torch.Tensor,
                ) -> tuple[torch.Tensor, ...]:
        return alignment.align_tensors(scores, key_bias, semantic_keys, other_keys, kappa, blend, on)


class CompiledOperator:
    """Calls the compiled package: the inputs of `align_tensors` in (`on` given), its six outputs out."""

    def __init__(self, package: Path) -> None:
        self._loader = torch._inductor.aoti_load_package(str(package)).loader

    def run(self, args: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._loader.run(args)  # type: ignore[no-any-return]


def _example() -> tuple[torch.Tensor, ...]:
    r, h, k = 3, 4, 20
    gen = torch.Generator().manual_seed(0)
    keys = torch.rand(r, 1, k, generator=gen)
    return (torch.randn(r, h, k, generator=gen), torch.zeros(r, 1, k), (keys < 0.3).float(), (keys > 0.6).float(),
            torch.full((r, 1), 0.2), torch.full((r, 1, 1), 0.5), torch.tensor([[True], [False], [True]]))


def _build(path: Path) -> None:
    rows, heads, keys = (torch.export.Dim(n, min=1, max=_MAX) for n in ("rows", "heads", "keys"))
    per_row = {0: rows, 2: keys}
    dynamic = ({0: rows, 1: heads, 2: keys}, per_row, per_row, per_row, {0: rows}, {0: rows}, {0: rows})
    program = torch.export.export(_Operator(), _example(), dynamic_shapes=dynamic)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def _package_name() -> str:
    source = Path(alignment.__file__).read_bytes() + Path(__file__).read_bytes()
    key = b"|".join([source, torch.__version__.encode(), torch.backends.cpu.get_cpu_capability().encode(),
                     platform.python_version().encode(), platform.machine().encode()])
    return f"alignment-{hashlib.sha256(key).hexdigest()[:16]}.pt2"


def _build_logged(path: Path) -> None:
    t0 = time.perf_counter()
    _build(path)
    log.info("alignment operator compiled", extra={"fields": {"seconds": round(time.perf_counter() - t0, 1)}})


def load() -> CompiledOperator | None:
    """The compiled operator, built on first use; None (eager operator) when turned off or not buildable."""
    if os.environ.get("SEVI_COMPILED_OPERATOR", "1") == "0":
        return None
    with _LOCK:
        try:
            return CompiledOperator(cached_file(_package_name(), _build_logged))
        except Exception as exc:  # noqa: BLE001 - any failure leaves the eager operator, which is correct
            log.warning("alignment operator not compiled (%s: %s); running it eagerly", type(exc).__name__, exc)
            return None

