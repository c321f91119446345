"""What the alignment did for one request: the one definition of the telemetry both engines report.

The reference engine (`sevi.engines.reference.generation`) and the vLLM plugin (`sevi.engines.vllm.plugin`) count
the same things in their own places; each ends a request with a :class:`Telemetry`, and the HTTP schema
(`server.schemas.common.Telemetry`) mirrors its fields (a test holds them equal).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

# Counted by the attention per aligned (row, layer), in this order in the engines' `[B, 4]` counter tensors.
COUNTERS = ("aligned_rows", "stage1_rows", "stage2_rows", "heads_reweighted")
# Counters of rows: with tensor parallelism each shard of a stage sees the same rows (counted once per stage).
ROW_FIELDS = COUNTERS[:3]
# Counters of heads: each tensor-parallel shard holds its own heads (summed over shards).
HEAD_FIELDS = COUNTERS[3:]
# Contrastive decoding of the request, decided where the logits are (the same on every worker).
PAIR_FIELDS = ("contrast_steps", "contrast_dissolved")


@dataclass(frozen=True)
class Telemetry:
    """Rows aligned, rows where stage 1 / stage 2 fired and heads re-weighted (each summed over every aligned
    (row, layer)); tokens chosen by contrastive decoding; and 1 when the vLLM engine had to end the request's
    contrast pair early (its two rows fell out of lockstep: the rest of the output had no contrast), else 0."""

    aligned_rows: int = 0
    stage1_rows: int = 0
    stage2_rows: int = 0
    heads_reweighted: int = 0
    contrast_steps: int = 0
    contrast_dissolved: int = 0

    @classmethod
    def from_counts(
        cls, counts: Sequence[int], *, contrast_steps: int = 0, contrast_dissolved: bool = False
    ) -> Telemetry:
        """From the attention's counters (in :data:`COUNTERS` order) and the request's contrast record."""
        values = dict(zip(COUNTERS, (int(c) for c in counts), strict=True))
        return cls(**values, contrast_steps=int(contrast_steps), contrast_dissolved=int(contrast_dissolved))

    @classmethod
    def from_mapping(cls, values: Mapping[str, int]) -> Telemetry:
        """From counters by name (the vLLM workers' replies); missing names count 0, unknown ones are an error."""
        return cls(**{name: int(value) for name, value in values.items()})

    def counters(self) -> list[int]:
        """The attention's counters, in :data:`COUNTERS` order."""
        return [getattr(self, name) for name in COUNTERS]

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# The groups above name every field exactly once: a field added to Telemetry must be given a group.
assert tuple(f.name for f in fields(Telemetry)) == COUNTERS + PAIR_FIELDS
