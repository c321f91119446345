"""The SEVI logits processor: carries per-request parameters to the attention backend, and pairs rows
for cross-image contrastive decoding (spec section 3).

Parameters: `validate_params` runs in vLLM's front end: it resolves a `vllm serve` user's raw knob once, with
the served model's presets (`params.resolve_front_end`, `front_end.py`), puts the resolved row in its place, and
refuses bad values (a ValueError there is an HTTP 400 in vLLM's server and an error at submission in ours);
`update_state` runs in the worker before each forward, after the batch was condensed and reordered, decodes
each new request's row (`params.from_extra_args`: no second resolution) and files one :class:`Row` per batch
index in the row table (:data:`sevi.engines.vllm.plugin.state.STATE`), from which the backends' metadata builders
build each step's plan (step.py).

Contrast pairs: our engine submits two requests per contrasted request, a main row (`sevi_role=main`,
aligned, on the real image) and a contrast row (`sevi_role=contrast`, unmodified model, on a contrast
image), with the same `sevi_pair`. At each step where both rows sample the same output index, `apply`
combines their logits with :func:`sevi.method.contrastive.contrast_logits`, applies the request's min_tokens
and repetition / frequency / presence penalties to the result, chooses the main row's token (greedy, or
sampled exactly as the reference engine samples, with its top_k / min_p / top_p: `sevi.method.sampling`, a
torch generator seeded by the request's seed) and forces that token on both rows by making their logits
one-hot, so vLLM's sampler can only pick it and the contrast row's cache follows the main row's prefix.
(vLLM applies its own penalties after this processor: to one-hot logits they change nothing, so they are left on.)

Lockstep and preemption: a row "samples" in a step when its seq_len equals prompt + outputs (a partial
prefill chunk does not). If both rows are preempted and resumed together they recompute and stay
paired. If in some step one row samples and the other does not (one preempted, or prefill chunked
apart), the pair is dissolved for good: the main row goes on with its own SEVI-aligned logits and no
contrast (telemetry says `contrast_dissolved`), and the contrast row is ended with EOS (the engine also
aborts it). Waiting is not an option: vLLM appends a sampled token to every row it schedules.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from sevi.engines.vllm.plugin import front_end
from sevi.engines.vllm.plugin.params import from_extra_args, resolve_front_end
from sevi.engines.vllm.plugin.state import STATE, Row
from sevi.families import eos_token_ids, find_spec, image_token_id, text_config
from sevi.method.contrastive import contrast_logits
from sevi.method.knob import AlignmentParamError
from sevi.method.sampling import apply_penalties, block_tokens, sample_token

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

_GREEDY_EPS = 1e-5  # vLLM treats temperature below this as greedy
_MAX_GENERATORS = 4096


def model_facts(hf_config: Any) -> dict[str, Any]:
    """Depth, image token id, "other" rule and EOS of a vLLM model's HF config, from its family's spec."""
    spec = find_spec(getattr(hf_config, "model_type", None))
    token = image_token_id(hf_config)
    eos = eos_token_ids(hf_config)
    # A model of no known family keeps the LLaVA rule rather than failing: vLLM loads the plugin for every
    # model it serves, and one without an image token is never aligned.
    return {
        "num_layers": int(text_config(hf_config).num_hidden_layers),
        "image_token_id": token if token is not None else -1,
        "other_is_image_only": spec is not None and spec.other_is_image_only,
        "eos_token_id": eos[0] if eos else None,
    }


class SeviLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Resolve a raw knob once (the served model's presets) and carry the resolved row on; check a resolved
        one. It rewrites `extra_args` on the request's own params, before vLLM copies them for the engine core:
        the one way a front-end hook can hand the worker anything. Running twice on shared params is harmless
        (the second run finds a resolved row)."""
        extra = sampling_params.extra_args
        try:
            served = front_end.served()
            if served is None:
                # No front end recorded a served model (vLLM builds an InputProcessor before it admits any
                # request, so only a caller of this method alone gets here): a resolved row is still checked.
                from_extra_args(extra)
                return
            resolved = resolve_front_end(extra, served.num_layers, served.knob_map)
        except AlignmentParamError as err:
            raise ValueError(str(err)) from err
        if resolved is not None:
            sampling_params.extra_args = resolved

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        # The model's facts only: the knob was resolved in the front end, with the served folder's presets.
        STATE.configure(**model_facts(vllm_config.model_config.hf_config))
        self._pairs: dict[str, list[int | None]] = {}  # pair id -> [main index, contrast index]
        self._generators: OrderedDict[str, torch.Generator] = OrderedDict()

    def is_argmax_invariant(self) -> bool:
        return False  # contrastive decoding changes the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        STATE.begin_step(batch_update is not None)
        if batch_update is None:
            return
        for index in batch_update.removed:
            STATE.remove(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            if index < STATE.batch_size and STATE.rows[index] is not None:
                STATE.remove(index)
            row = self._row(params, prompt_ids or [], output_ids)
            if row is not None:
                STATE.add(index, row)
        for a, b, direction in batch_update.moved:
            STATE.move(a, b, direction == MoveDirectionality.SWAP)
        STATE.resize(batch_update.batch_size)  # an entry per batch index, None where a request has no row
        self._index_pairs()

    def _row(self, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> Row | None:
        try:
            request = from_extra_args(params.extra_args)
        except AlignmentParamError:  # validated in the front end already; never fail a worker step
            return None
        if request is None:
            return None
        mask = np.asarray(prompt_ids, dtype=np.int64) == STATE.image_token_id
        found = np.flatnonzero(mask)
        last = int(found[-1]) if found.size else -1
        seed = params.seed if params.seed is not None else request.seed
        return Row(
            request=request,
            prompt_len=len(prompt_ids),
            last_image=last,
            image_mask=mask,
            output_ids=output_ids,
            temperature=float(params.temperature),
            top_p=float(params.top_p),
            seed=int(seed) if seed is not None else None,
            presence_penalty=float(params.presence_penalty),
            frequency_penalty=float(params.frequency_penalty),
            repetition_penalty=float(params.repetition_penalty),
            prompt_ids=list(prompt_ids) if params.repetition_penalty != 1.0 else [],
            top_k=max(0, int(params.top_k)),
            min_p=float(params.min_p),
            min_tokens=int(params.min_tokens),
            stop_ids=sorted(params.all_stop_token_ids) if params.min_tokens else [],
        )

    def _index_pairs(self) -> None:
        pairs: dict[str, list[int | None]] = {}
        for i, row in enumerate(STATE.rows):
            if row is None or row.request.pair is None:
                continue
            slot = pairs.setdefault(row.request.pair, [None, None])
            slot[0 if row.request.role == "main" else 1] = i
        self._pairs = pairs

    # ---- contrastive decoding ----
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._pairs:
            return logits
        mains: list[int] = []
        partners: list[int] = []
        end_rows: list[int] = []
        for pair, (m, c) in self._pairs.items():
            state = self._pair_state(pair, m, c)
            if state == "combine":
                assert m is not None and c is not None
                mains.append(m)
                partners.append(c)
            elif state == "end" and c is not None:
                end_rows.append(c)
        if mains:
            self._combine(logits, mains, partners)
        if end_rows and STATE.eos_token_id is not None:
            _force(
                logits, _indices(end_rows, logits.device), _indices([STATE.eos_token_id] * len(end_rows), logits.device)
            )
        return logits

    def _pair_state(self, pair: str, m: int | None, c: int | None) -> str:
        """'combine', 'wait' (neither row samples now), 'alone' (main goes on alone) or 'end' the contrast."""
        if pair in STATE.dissolved_pairs:
            return "end"
        sm = m is not None and _samples(m)
        sc = c is not None and _samples(c)
        if not sm and not sc:
            return "wait"
        if sm and sc and len(_row(m).output_ids) == len(_row(c).output_ids):
            return "combine"
        STATE.dissolved_pairs.add(pair)  # out of lockstep: see the module docstring
        return "end"

    def _combine(self, logits: torch.Tensor, mains: list[int], partners: list[int]) -> None:
        # Greedy pairs stay on the device (no token is read back); a sampled pair's draw is the reference
        # engine's CPU sampler, so it reads its row back.
        rows = _indices(mains + partners, logits.device)
        mixed = contrast_logits(logits[rows[: len(mains)]], logits[rows[len(mains) :]])
        for k, m in enumerate(mains):  # penalties on what the token is chosen from, as the reference engine does
            row = _row(m)
            if len(row.output_ids) < row.min_tokens:
                block_tokens(mixed[k], row.stop_ids)
            apply_penalties(
                mixed[k],
                row.output_ids,
                row.presence_penalty,
                row.frequency_penalty,
                row.repetition_penalty,
                row.prompt_ids,
            )
        tokens = mixed.argmax(-1)
        for k, m in enumerate(mains):
            row = _row(m)
            pair = row.request.pair
            assert pair is not None
            STATE.contrast_steps[pair] = STATE.contrast_steps.get(pair, 0) + 1
            if row.temperature >= _GREEDY_EPS:
                tokens[k] = self._sample(pair, row, mixed[k])
        _force(logits, rows, tokens.repeat(2))

    def _sample(self, pair: str, row: Row, logits: torch.Tensor) -> int:
        """The reference engine's draw (sevi.method.sampling.sample_token) with the pair's own generator."""
        gen = self._generators.get(pair)
        if gen is None:
            seed = row.seed if row.seed is not None else pair_seed(pair)
            gen = torch.Generator().manual_seed(seed)
            self._generators[pair] = gen
            while len(self._generators) > _MAX_GENERATORS:
                self._generators.popitem(last=False)
        return sample_token(logits, row.temperature, row.top_p, gen, row.top_k, row.min_p)


def pair_seed(pair: str) -> int:
    """The seed of an unseeded sampled pair, derived from its id: every tensor-parallel worker samples the
    pair and must draw the same token (a worker's own RNG would differ from the others')."""
    return int.from_bytes(hashlib.sha256(pair.encode()).digest()[:8], "little") >> 2


def _row(index: int | None) -> Row:
    assert index is not None
    row = STATE.rows[index]
    assert row is not None
    return row


def _samples(index: int) -> bool:
    """Whether this row's token this step is kept: its seq_len reaches prompt + outputs (no partial prefill)."""
    row = _row(index)
    if STATE.seq_lens is None or index >= STATE.seq_lens.shape[0]:
        return True
    return int(STATE.seq_lens[index]) == row.prompt_len + len(row.output_ids)


def _indices(values: list[int], device: torch.device) -> torch.Tensor:
    """Row or token ids on `device`. On a GPU through pinned memory and an asynchronous copy: a copy from
    pageable memory would first wait for the device to finish its queue."""
    if device.type == "cuda":
        return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(values, dtype=torch.long, device=device)


def _force(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> None:
    """One-hot logits: whatever vLLM's sampler does next (greedy, temperature, top-p), it picks `tokens`."""
    logits[rows] = float("-inf")
    logits[rows, tokens] = 0.0
