"""The alignment operator compiled ahead of time for the CPU (torch.export + AOTInductor).

Why: :func:`sevi.method.alignment.align_tensors` is about 35 small tensor ops per aligned layer, and on the
CPU each op costs microseconds of Python and dispatcher work whatever its size: most of SEVI's cost on
small models. Here torch traces that very function (no second implementation of the method) with the
rows, heads and keys as dynamic sizes, and AOTInductor compiles the graph into C++ called without
Python between the ops: 46 -> 6 us at one row, 57 -> 14 us at 8 rows x 111 keys (cache-hot).

Built once per (operator source, torch version, CPU ISA) into a cache folder (`SEVI_KERNEL_CACHE`,
default `~/.cache/sevi-serve`; about 10 s, with the system C++ compiler); afterwards loading takes
milliseconds. `SEVI_COMPILED_OPERATOR=0`, or a failed build (no compiler), keeps the eager operator.
With tensor parallelism the operator runs in two halves around the workers' exchange
(:func:`sevi.method.alignment.align_sharded`); each half is compiled the same way, as a package of its own.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import threading
import time
from pathlib import Path
from typing import Any

import torch

from sevi.kernels.build_cache import cached_file
from sevi.method import alignment
from sevi.runtime import runtime_env

log = logging.getLogger("sevi.alignment")

_LOCK = threading.Lock()
_MAX = 1 << 20  # bound of each dynamic size (export wants one)


class _Operator(torch.nn.Module):
    def forward(
        self,
        scores: torch.Tensor,
        key_bias: torch.Tensor,
        semantic_keys: torch.Tensor,
        other_keys: torch.Tensor,
        kappa: torch.Tensor,
        blend: torch.Tensor,
        on: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        return alignment.align_tensors(scores, key_bias, semantic_keys, other_keys, kappa, blend, on)


class _ShardPartials(torch.nn.Module):
    def forward(
        self,
        scores: torch.Tensor,
        key_bias: torch.Tensor,
        semantic_keys: torch.Tensor,
        other_keys: torch.Tensor,
        kappa: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        return alignment.shard_partials(scores, key_bias, semantic_keys, other_keys, kappa)


class _ShardFinish(torch.nn.Module):
    def forward(
        self,
        s: torch.Tensor,
        semantic: torch.Tensor,
        glob: torch.Tensor,
        every: torch.Tensor,
        blend: torch.Tensor,
        on: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        return alignment.shard_finish(s, semantic, glob, every, blend, on)


class CompiledOperator:
    """Calls a compiled package: the traced function's tensor inputs in, its outputs out."""

    def __init__(self, package: Path) -> None:
        self._loader = torch._inductor.aoti_load_package(str(package)).loader

    def run(self, args: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._loader.run(args)  # type: ignore[no-any-return]


def _example() -> tuple[torch.Tensor, ...]:
    # float32 spelt out: the package is traced for its example's dtypes, and vLLM builds it while loading a
    # model under `set_default_torch_dtype(model dtype)`: a bfloat16 model made a bfloat16 package, cached
    # under the same name, that returned bfloat16 and wrong head groups to every later float32 caller.
    r, h, k = 3, 4, 20
    f32 = torch.float32
    gen = torch.Generator().manual_seed(0)
    keys = torch.rand(r, 1, k, generator=gen, dtype=f32)
    return (
        torch.randn(r, h, k, generator=gen, dtype=f32),
        torch.zeros(r, 1, k, dtype=f32),
        (keys < 0.3).to(f32),
        (keys > 0.6).to(f32),
        torch.full((r, 1), 0.2, dtype=f32),
        torch.full((r, 1, 1), 0.5, dtype=f32),
        torch.tensor([[True], [False], [True]]),
    )


def _program(name: str) -> torch.export.ExportedProgram:
    """The traced function `name` with rows, heads and keys (and shards) as dynamic sizes."""
    rows, heads, keys = (torch.export.Dim(n, min=1, max=_MAX) for n in ("rows", "heads", "keys"))
    per_row = {0: rows, 2: keys}
    scores, bias, semantic_keys, other_keys, kappa, blend, on = _example()
    dynamic: tuple[dict[int, Any], ...]
    if name == "operator":
        dynamic = ({0: rows, 1: heads, 2: keys}, per_row, per_row, per_row, {0: rows}, {0: rows}, {0: rows})
        return torch.export.export(_Operator(), _example(), dynamic_shapes=dynamic)
    if name == "shard_partials":
        dynamic = ({0: rows, 1: heads, 2: keys}, per_row, per_row, per_row, {0: rows})
        return torch.export.export(
            _ShardPartials(), (scores, bias, semantic_keys, other_keys, kappa), dynamic_shapes=dynamic
        )
    if name == "shard_finish":
        s, semantic, _, glob, packed = alignment.shard_partials(scores, bias, semantic_keys, other_keys, kappa)
        every = torch.stack([packed, packed.flip(0)])  # two shards
        shards = torch.export.Dim("shards", min=2, max=1 << 12)
        dynamic = (
            {0: rows, 1: heads, 2: keys},
            {0: rows, 1: heads},
            {0: rows, 1: heads},
            {0: shards, 1: rows, 2: 2 * keys + 3},
            {0: rows},
            {0: rows},
        )
        return torch.export.export(_ShardFinish(), (s, semantic, glob, every, blend, on), dynamic_shapes=dynamic)
    raise ValueError(f"no compiled function {name!r}")


def _build(path: Path, name: str = "operator") -> None:
    # Constants the traced function makes without a dtype follow the default dtype too: trace in float32
    # whatever the caller's context (see _example).
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        # AOTInductor writes the build's device facts into the process-wide `aot_inductor.metadata` dict in place;
        # vLLM hashes inductor's config into its compile-cache key, so a process that built the operator (a cold
        # cache) and one that loaded it (a warm cache) got different keys and every restart compiled the model
        # again (about 30-50 s). The build gets a dict of its own.
        with torch._inductor.config.patch({"aot_inductor.metadata": {}}):
            torch._inductor.aoti_compile_and_package(_program(name), package_path=str(path))
    finally:
        torch.set_default_dtype(default)


def _package_name(name: str = "operator") -> str:
    source = Path(alignment.__file__).read_bytes() + Path(__file__).read_bytes()
    key = b"|".join(
        [
            source,
            torch.__version__.encode(),
            torch.backends.cpu.get_cpu_capability().encode(),
            platform.python_version().encode(),
            platform.machine().encode(),
        ]
    )
    prefix = "alignment" if name == "operator" else f"alignment-{name}"
    return f"{prefix}-{hashlib.sha256(key).hexdigest()[:16]}.pt2"


def _build_logged(path: Path, name: str) -> None:
    t0 = time.perf_counter()
    _build(path, name)
    log.info(
        "alignment operator compiled",
        extra={"fields": {"function": name, "seconds": round(time.perf_counter() - t0, 1)}},
    )


def load(name: str = "operator") -> CompiledOperator | None:
    """The compiled function `name` (`operator`: :func:`alignment.align_tensors`; `shard_partials`,
    `shard_finish`: the halves of :func:`alignment.align_sharded`), built on first use; None (eager) when
    turned off or not buildable."""
    if not runtime_env.current().compiled_operator:
        return None
    with _LOCK:
        try:
            return CompiledOperator(cached_file(_package_name(name), lambda path: _build_logged(path, name)))
        except Exception as exc:  # noqa: BLE001 - any failure leaves the eager operator, which is correct
            log.warning("alignment operator not compiled (%s: %s); running it eagerly", type(exc).__name__, exc)
            return None
