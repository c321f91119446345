"""vLLM scheduler for SEVI: contrast pairs scheduled in lockstep, and a prefix cache that never hands out
aligned rows.

Contrast pairs (spec section 3). Our engine adds two requests per contrasted request, a contrast row and a
main row sharing `sevi_pair` (params.py). The logits processor combines their logits only at steps where
both rows sample the same output index; vLLM's stock scheduler treats them as strangers, so under load its
token budget, chunked prefill, seat limit or encoder budget gives the two prompts different steps and the
pair falls apart (14 of 48 requests at 576 image tokens, 16 at a time). Here:

- the two rows sit side by side in the running list (contrast first), so nothing is scheduled between them;
- a row finishes its prefill (samples) only in a step where its partner does too: the first row of the
  pair to be scheduled plans the step for both, and lets them finish only when the partner surely can
  (the step's token budget left covers both remainders, no image of the partner still to encode, and its
  KV blocks are allocated up front, together with the first row's); otherwise each row keeps its last
  token back. New pairs are admitted with their last token kept back, so they finish together in a later
  step (one extra step before the first token: the price of not predicting the partner's prefix hit);
- a row whose partner has not arrived yet is held back (vLLM's `AsyncLLM` sends the two rows to the engine core
  process one message each, and a step may run between them);
- under memory preemption the two rows are preempted together and resume together (they re-prefill
  their prompt and outputs, and finish that in one step as above).

One hook per concern, all of them methods vLLM calls per request: `_reserve_prefill_lookahead` (the last
word on a request's token count in both of the scheduler's loops), `_preempt_request`,
`_get_local_prefix_cache_hit`, and the KV cache manager's `allocate_slots` (wrapped on this scheduler's
own manager: the one place that says whether a request fits).

Prefix cache (spec section 2: a request aligns its last prompt row and every generated row; every earlier
prompt row is computed unaligned). Blocks made only of rows before the last prompt row are the unmodified
model's, exact for any request whatever its knobs; any block holding an aligned row is not. So an aligned
request caches only its full blocks before its last prompt row (image and system-prompt blocks stay
shared), and reads at most that many from the cache when it resumes after preemption. No cache salt is
needed: every cached block is an unaligned one.

Pairs are kept together under the FCFS policy (the engine's); the priority policy picks preemption victims
anywhere in the batch, which could split a pair already scheduled, so it is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from sevi.engines.vllm.plugin.params import from_extra_args
from sevi.method.knob import AlignmentParamError

log = logging.getLogger("sevi.vllm.scheduler")


@dataclass
class _Step:
    """What the scheduler decided so far in the current step (its own loops keep theirs in locals)."""

    used: int = 0  # tokens scheduled (allocated) so far
    planned: dict[str, int] = field(default_factory=dict)  # request id -> tokens its hook returned
    seen: set[str] = field(default_factory=set)  # pair rows whose hook ran
    joint: dict[str, int] = field(default_factory=dict)  # second row -> tokens that finish it with its partner
    together: dict[str, tuple[Request, int]] = field(default_factory=dict)  # first row -> (partner, its tokens)
    scheduled: set[str] = field(default_factory=set)
    preempted: set[str] = field(default_factory=set)
    current: str | None = None  # the request being allocated (the preemption loop's own request)


class SeviScheduler(Scheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.policy == SchedulingPolicy.PRIORITY:
            raise ValueError(
                "SeviScheduler keeps contrast pairs together under the FCFS policy only "
                "(the priority policy preempts anywhere in the batch)"
            )
        self._role: dict[str, tuple[str, str]] = {}  # request id -> (role, pair id)
        self._pairs: dict[str, dict[str, str]] = {}  # pair id -> role -> request id
        self._complete: set[str] = set()  # pairs both of whose rows have arrived (the first is held until then)
        self._aligned: set[str] = set()  # requests whose rows from the last prompt row on are aligned
        self._stash: dict[str, KVCacheBlocks] = {}  # blocks allocated for a second row ahead of its turn
        self._step = _Step()
        self._last_tokens = -1  # tokens of the last step (0: nothing could run)
        self.split_pairs = 0  # pairs that sampled apart (should stay 0; logged as errors)
        manager = self.kv_cache_manager
        self._allocate_slots = manager.allocate_slots
        setattr(manager, "allocate_slots", self._allocate)  # noqa: B010 - this scheduler's own manager
        self._cache_blocks = manager.coordinator.cache_blocks
        setattr(manager.coordinator, "cache_blocks", self._cache_unaligned)  # noqa: B010

    # ---- request bookkeeping ----
    def add_request(self, request: Request) -> None:
        super().add_request(request)
        extra = request.sampling_params.extra_args if request.sampling_params is not None else None
        try:
            row = from_extra_args(extra)  # the row the front end resolved, as the worker decodes it
        except AlignmentParamError:  # validated in the front end; never fail the engine core here
            return
        if row is None:
            return
        rid = request.request_id
        if row.aligned:
            self._aligned.add(rid)
        role, pair = row.role, row.pair
        if role is not None and pair is not None:
            self._role[rid] = (role, pair)
            members = self._pairs.setdefault(pair, {})
            members[role] = rid
            if len(members) == 2:
                self._complete.add(pair)

    def _free_request(self, request: Request, delay_free_blocks: bool = False) -> Any:
        rid = request.request_id
        self._aligned.discard(rid)
        self._stash.pop(rid, None)
        found = self._role.pop(rid, None)
        if found is not None:
            members = self._pairs.get(found[1], {})
            members.pop(found[0], None)
            if not members:
                self._pairs.pop(found[1], None)
                self._complete.discard(found[1])
        return super()._free_request(request, delay_free_blocks)

    def _partner(self, rid: str) -> Request | None:
        found = self._role.get(rid)
        if found is None:
            return None
        role, pair = found
        other = self._pairs.get(pair, {}).get("main" if role == "contrast" else "contrast")
        return self.requests.get(other) if other is not None else None

    # ---- the step ----
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        self._step = _Step()
        if self._role:
            self._pair_up_running()
            if self._last_tokens == 0:
                self._unblock()
        out = super().schedule(throttle_prefills)
        self._last_tokens = out.total_num_scheduled_tokens
        if self._role:
            self._check(out)
        return out

    def _pair_up_running(self) -> None:
        """Each pair's rows side by side, contrast first, where the earlier of the two was."""
        by_id = {r.request_id: r for r in self.running}
        ordered: list[Request] = []
        placed: set[str] = set()
        for request in self.running:
            rid = request.request_id
            if rid in placed:
                continue
            partner = self._partner(rid)
            if partner is None or partner.request_id not in by_id:
                ordered.append(request)
                placed.add(rid)
                continue
            pair = [request, partner] if self._role[rid][0] == "contrast" else [partner, request]
            ordered.extend(pair)
            placed.update(r.request_id for r in pair)
        self.running[:] = ordered

    def _unblock(self) -> None:
        """Nothing ran last step: a row whose partner is still waiting (and can only be admitted once memory
        frees) holds blocks it cannot use. Preempt such rows so their pairs are admitted whole."""
        for request in list(self.running):
            partner = self._partner(request.request_id)
            if partner is not None and partner.status != RequestStatus.RUNNING:
                self.running.remove(request)
                super()._preempt_request(request, 0.0)

    def _check(self, out: SchedulerOutput) -> None:
        """Count pairs whose rows sample apart this step (the logits processor would dissolve them)."""
        sampled = {rid for rid in out.num_scheduled_tokens if rid in self._role and self._samples(rid)}
        for rid in sampled:
            partner = self._partner(rid)
            if partner is not None and partner.request_id not in sampled:
                self.split_pairs += 1
                log.error("contrast pair %s sampled apart in one step", self._role[rid][1])

    def _samples(self, rid: str) -> bool:
        request = self.requests[rid]
        return request.num_computed_tokens >= request.num_tokens + request.num_output_placeholders

    # ---- hooks ----
    def _reserve_prefill_lookahead(self, request: Request, num_computed_tokens: int, num_new_tokens: int) -> int:
        n = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        rid = request.request_id
        if rid in self._role:
            n = self._pair_tokens(request, num_computed_tokens, n)
        self._step.planned[rid] = n
        return n

    def _pair_tokens(self, request: Request, computed: int, n: int) -> int:
        """Tokens for one row of a pair: never finish its prefill (sample) unless its partner does too."""
        step = self._step
        rid = request.request_id
        step.seen.add(rid)
        planned = step.joint.pop(rid, None)
        if planned is not None:  # the partner, scheduled just before, finishes with these tokens
            if n < planned:
                log.error("contrast pair %s: the second row got %d of %d tokens", self._role[rid][1], n, planned)
            return min(n, planned)
        partner = self._partner(rid)
        if partner is None and self._role[rid][1] not in self._complete:
            return 0  # its partner has not arrived yet (an engine core in its own process gets the rows one by one)
        if partner is None or n == 0:
            return n  # alone (its partner ended): nothing to keep in step with
        remaining = self._remaining(request, computed)
        running = request.status == RequestStatus.RUNNING
        if (
            running
            and partner.status == RequestStatus.RUNNING
            and partner.request_id not in step.seen
            and self._next_in_running(request, partner)
        ):
            left = self._remaining(partner, partner.num_computed_tokens)
            if n == remaining and self._budget_left() >= n + left and self._can_finish(partner, left):
                step.joint[partner.request_id] = left
                step.together[rid] = (partner, left)
                return n
        if not running and partner.status != RequestStatus.RUNNING and partner.request_id not in step.seen:
            # A pair being admitted: room for both rows, and half the budget left for the second one.
            if not self._room_for_pair(request, partner):
                return 0
            n = min(n, max(1, self._budget_left() // 2))
        return max(0, min(n, remaining - 1))

    def _remaining(self, request: Request, computed: int) -> int:
        return request.num_tokens_with_spec + request.num_output_placeholders - computed

    def _next_in_running(self, request: Request, partner: Request) -> bool:
        i = self.running.index(request)
        return i + 1 < len(self.running) and self.running[i + 1] is partner

    def _budget_left(self) -> int:
        cap = min(self.max_num_scheduled_tokens, self.scheduler_config.max_num_batched_tokens)
        return cap - self._step.used

    def _can_finish(self, partner: Request, tokens: int) -> bool:
        """Whether the stock loop will give the partner (a running row, next in line) all `tokens` this step,
        budget aside: no long-prefill cap, no context cap, and no image of it still to encode (the encoder
        budget and cache are the stock loop's own; an image already started is in the encoder cache)."""
        threshold = self.scheduler_config.long_prefill_token_threshold
        if 0 < threshold < tokens:
            return False
        computed = partner.num_computed_tokens
        if tokens > self.max_model_len - computed - self.num_sampled_tokens_per_step:
            return False
        end = computed + tokens
        return not any(computed <= f.mm_position.offset < end for f in partner.mm_features)

    def _room_for_pair(self, request: Request, partner: Request) -> bool:
        """Seats and (if the cache can hold them at all) KV blocks for both whole sequences, so the second
        row is admitted right after the first."""
        seats = len(self.running) + self.num_waiting_for_streaming_input + 2
        if seats > self.max_num_active_reqs:
            return False
        manager = self.kv_cache_manager
        need = sum(-(-r.num_tokens // self.block_size) for r in (request, partner)) + manager.watermark_blocks
        total = manager.block_pool.num_gpu_blocks - 1  # the null block is never handed out
        return need > total or need <= manager.block_pool.get_num_free_blocks()

    def _allocate(self, request: Request, num_new_tokens: int, *args: Any, **kwargs: Any) -> KVCacheBlocks | None:
        """The manager's allocate_slots, pair-aware: a first row that finishes with its partner allocates the
        partner's slots too (kept for the partner's turn), or fails so that the stock loop preempts from the
        tail and the pair goes back to waiting together."""
        step = self._step
        rid = request.request_id
        step.current = rid
        partner = self._partner(rid)
        if partner is not None and partner.request_id in step.preempted:
            return None  # the next victim is this row itself: both wait
        together = step.together.get(rid)
        if together is not None:
            other, tokens = together
            ahead = self._allocate_slots(other, tokens, num_lookahead_tokens=self.num_lookahead_tokens)
            if ahead is None:
                return None
            self._stash[other.request_id] = self._stash.get(other.request_id, ahead.new_empty()) + ahead
        blocks = self._allocate_slots(request, num_new_tokens, *args, **kwargs)
        if blocks is None:
            return None
        stashed = self._stash.pop(rid, None)
        if stashed is not None:
            blocks = stashed + blocks
        step.used += step.planned.get(rid, num_new_tokens)
        step.scheduled.add(rid)
        return blocks

    def _preempt_request(self, request: Request, timestamp: float, drop_stale_output: bool = False) -> None:
        super()._preempt_request(request, timestamp, drop_stale_output)
        step = self._step
        rid = request.request_id
        step.preempted.add(rid)
        self._stash.pop(rid, None)
        partner = self._partner(rid)
        if partner is None or partner.status != RequestStatus.RUNNING or partner.request_id == step.current:
            return  # waiting already, or the request being allocated (its allocation fails next: see _allocate)
        if partner.request_id in step.scheduled:
            self.split_pairs += 1  # cannot happen with the rows side by side under FCFS
            log.error("contrast pair %s: a row was preempted after its partner was scheduled", self._role[rid][1])
            return
        self.running.remove(partner)
        super()._preempt_request(partner, timestamp, drop_stale_output)
        step.preempted.add(partner.request_id)
        self._stash.pop(partner.request_id, None)

    def _get_local_prefix_cache_hit(self, request: Request) -> tuple[KVCacheBlocks, int, int, bool]:
        blocks, hit, boundary, diverged = super()._get_local_prefix_cache_hit(request)
        rid = request.request_id
        cap = hit
        if rid in self._aligned:  # resumed after preemption: its rows from the last prompt row on are aligned
            cap = min(cap, request.num_prompt_tokens - 1)
        if rid in self._role:  # keep two tokens to compute, so the row is admitted with its last one kept back
            cap = min(cap, request.num_tokens - 2)
        if cap < hit:
            hit = max(0, cap) // self.block_size * self.block_size
            blocks = self.kv_cache_manager.truncate_computed_blocks(blocks, hit)
        return blocks, hit, boundary, diverged

    def _cache_unaligned(self, request: Request, num_computed_tokens: int) -> None:
        """The coordinator's cache_blocks, capped for aligned requests at the rows before the last prompt row."""
        if request.request_id in self._aligned:
            num_computed_tokens = min(num_computed_tokens, request.num_prompt_tokens - 1)
        self._cache_blocks(request, num_computed_tokens)
