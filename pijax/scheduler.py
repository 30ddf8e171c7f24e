"""Host-side scheduler: continuous batching, chunked prefill, priorities, preemption by recompute.

`schedule()` returns a `StepPlan`, an immutable record of the step (per sequence: request id,
start position, new tokens, whether it samples, its pages and sampling parameters), from which the
batch is built without touching the block manager or live requests; `update(plan, sampled)` folds
the device's results back in and returns the requests that produced a token. The scheduler sees KV memory only through `KVCacheManager`; it knows nothing of devices,
tokenizers, hashes or the network.

Policy, each in its own small method:
  * running requests go first (most urgent class first, then by arrival): one decode token each,
    or the next prefill chunk — so a long prompt never stalls decoding neighbours for more than
    one step's token budget;
  * the remaining budget admits waiting requests in order of effective priority, then arrival;
    nobody overtakes the head of the queue (no starvation by small requests);
  * priorities: lower value = more urgent (as in vLLM). A waiting request's effective priority
    improves by one class every `priority_aging_steps` steps it waits, so a stream of urgent
    requests cannot starve a batch re-scoring job forever;
  * admission keeps room for growth (`_can_admit`): a waiting request is admitted only if the
    pool can hold its next chunk plus the projected growth of itself and of the running requests
    at least as urgent as it: `growth_ratio` of each one's remaining tokens (prompt + max_tokens
    minus what it holds), plus a watermark of `WATERMARK` of the pool. The ratio starts at
    `GROWTH_RATIO_INIT`, decays by `GROWTH_RATIO_DECAY` a step to `GROWTH_RATIO_MIN` while nothing
    is preempted (requests mostly stop early), and jumps to 1 at a preemption (the load has
    shown it needs its full length), as SGLang's new-token ratio does. With nothing running the
    head is admitted as soon as its chunk fits, so the queue never stalls;
  * when a running request needs a page and none is free, the victim is the least urgent, most
    recently admitted running request — never one more urgent than the request that needs the
    page (then that request itself yields). The victim's pages are freed (cached blocks stay
    cached where their scope allows) and it re-enters the queue ahead of its class, but is
    re-admitted only when it fits at its full length next to the full projected length of the
    running requests (ratio 1), so it is not recomputed only to be preempted again (thrash).
    A request that could never fit the pool alone is refused by the engine at `add_request`.

Data shards (`DataShardedKV`, a mesh whose `data` axis is > 1): every request lives on one shard
(placed at registration), and the limits above apply per shard: each shard has its own token
budget and `max_num_seqs` per step, admission and preemption look only at the request's shard,
and a head that cannot be admitted closes only its shard for the step. With one shard this is
exactly the policy above.
"""

from __future__ import annotations

import dataclasses
import math
import time

from pijax.config import SchedulerConfig
from pijax.kv_cache_manager import KVCacheManager
from pijax.request import PENDING_TOKEN, Request, RequestStatus, SamplingParams

GROWTH_RATIO_INIT = 0.5
GROWTH_RATIO_MIN = 0.15
GROWTH_RATIO_DECAY = 0.002  # per step: from 1 down to the minimum in ~400 steps
WATERMARK = 0.01  # share of the pool kept free at admission


@dataclasses.dataclass(frozen=True)
class SeqPlan:
    """One sequence's part of a step, copied out of the request and the block manager when the
    step is scheduled: nothing here changes when `update` runs or the request goes away."""

    request_id: str
    start: int  # tokens already computed: this step computes positions [start, start + n)
    num_new_tokens: int
    samples: bool  # the chunk reaches the request's last token, so a token is sampled
    token_ids: tuple[int, ...]  # the tokens at those positions
    block_ids: tuple[int, ...]  # the request's pages holding positions [0, start + n)
    params: SamplingParams
    seed: int
    # Which request of that id: an id is free again once its request finished, possibly while
    # a step planned for the old one is still in flight (overlapped scheduling).
    arrival_order: int = 0
    shard: int = 0  # the data shard whose pages `block_ids` name (`DataShardedKV`)

    @classmethod
    def of(
        cls, req: Request, num_new_tokens: int, table, page_size: int, shard: int = 0
    ) -> SeqPlan:
        start = req.num_computed_tokens
        end = start + num_new_tokens
        return cls(
            request_id=req.request_id,
            start=start,
            num_new_tokens=num_new_tokens,
            samples=end == req.num_tokens,
            token_ids=tuple(req.all_token_ids[start:end]),
            block_ids=tuple(table[: -(-end // page_size)]),
            params=req.params,
            seed=req.seed,
            arrival_order=req.arrival_order,
            shard=shard,
        )


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one step runs, as a record (the scheduler's output; the batch builder's input)."""

    seqs: tuple[SeqPlan, ...]
    preempted: tuple[str, ...]  # ids of the requests preempted while scheduling this step

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the request's tokens, so a token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclasses.dataclass
class SchedulePlan:
    """The plan while `schedule()` builds it (live requests); it returns it as a `StepPlan`."""

    seqs: list[ScheduledSeq]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.step_index = 0
        self._enqueued_at: dict[str, int] = {}
        self._requeued: set[str] = set()
        self._live: dict[str, Request] = {}  # every request added and not yet removed
        self._admitted_at: dict[str, int] = {}  # request id -> admission sequence number
        self._admissions = 0
        self.growth_ratio = GROWTH_RATIO_INIT

    # --- queue ----------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self._live[request.request_id] = request
        self.waiting.append(request)
        self._enqueued_at[request.request_id] = self.step_index

    def remove(self, request: Request, *, keep_session: bool = False) -> None:
        """Drop a request wherever it is and release its pages (finish or abort)."""
        self._live.pop(request.request_id, None)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._enqueued_at.pop(request.request_id, None)
        self._requeued.discard(request.request_id)
        self._admitted_at.pop(request.request_id, None)
        self.kv.finish(request, keep_session=keep_session)

    def get(self, request_id: str) -> Request | None:
        """The live request of a plan's `request_id` (None once removed)."""
        return self._live.get(request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def effective_priority(self, req: Request) -> int:
        waited = self.step_index - self._enqueued_at.get(req.request_id, self.step_index)
        return req.priority - waited // self.config.priority_aging_steps

    def _queue_key(self, req: Request):
        return (
            self.effective_priority(req),
            req.request_id not in self._requeued,
            req.arrival_order,
        )

    # --- scheduling -----------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        self.step_index += 1
        self.growth_ratio = max(GROWTH_RATIO_MIN, self.growth_ratio - GROWTH_RATIO_DECAY)
        plan = SchedulePlan(seqs=[], preempted=[])
        # Limits are per data shard: each shard's part of the step is its own ragged batch.
        budgets = [self.config.max_num_batched_tokens] * self.kv.num_shards
        self._schedule_running(plan, budgets)
        if not plan.preempted:
            self._admit_waiting(plan, budgets)
        now = time.monotonic()
        for s in plan.seqs:
            if s.request.timings.first_scheduled is None:
                s.request.timings.first_scheduled = now
        return self._record(plan)

    def _record(self, plan: SchedulePlan) -> StepPlan:
        kv = self.kv
        return StepPlan(
            seqs=tuple(
                SeqPlan.of(
                    s.request,
                    s.num_new_tokens,
                    kv.blocks_of(s.request).block_table(s.request.request_id),
                    kv.page_size,
                    kv.shard_of(s.request),
                )
                for s in plan.seqs
            ),
            preempted=tuple(r.request_id for r in plan.preempted),
        )

    def _chunk_size(self, req: Request, budget: int) -> int:
        if len(req.output_token_ids) >= req.params.max_tokens:
            return 0  # all its tokens exist (the last may be pending on the device): done
        n = req.num_uncomputed_tokens
        if not self.config.enable_chunked_prefill and n > budget:
            return 0  # without chunking a prefill runs whole or waits
        return min(n, budget)

    def _schedule_running(self, plan: SchedulePlan, budgets: list[int]) -> None:
        """Each running request's next chunk, out of its data shard's token budget."""
        self.running.sort(key=lambda r: (r.priority, r.arrival_order))
        i = 0
        while i < len(self.running) and any(b > 0 for b in budgets):
            req = self.running[i]
            d = self.kv.shard_of(req)
            n = self._chunk_size(req, budgets[d])
            if n == 0:
                i += 1
                continue
            total = req.num_computed_tokens + n
            if not self.kv.can_grow(req, total):
                victim = self._pick_victim(req)
                budgets[d] += sum(s.num_new_tokens for s in plan.seqs if s.request is victim)
                self._preempt(victim, plan)
                if victim is req:
                    continue  # `req` left the list; the next request moved into slot i
                if self.running.index(req) < i:
                    i -= 1
                continue  # retry `req` with the freed pages
            self.kv.grow(req, total)
            plan.seqs.append(ScheduledSeq(req, n))
            budgets[d] -= n
            i += 1

    def _pick_victim(self, needy: Request) -> Request:
        """Least urgent, most recently admitted running request of `needy`'s data shard (only
        its pages help); never more urgent than `needy`."""
        d = self.kv.shard_of(needy)
        victim = max(
            (r for r in self.running if self.kv.shard_of(r) == d),
            key=lambda r: (r.priority, self._admitted_at.get(r.request_id, 0), r.arrival_order),
        )
        return victim if victim.priority >= needy.priority else needy

    def _admit_waiting(self, plan: SchedulePlan, budgets: list[int]) -> None:
        """Admit in queue order. A request that cannot be admitted (no budget, no memory, no
        sequence slot on its data shard) closes that shard for this step: nobody overtakes the
        head of a shard's queue."""
        self.waiting.sort(key=self._queue_key)
        seqs = [0] * self.kv.num_shards
        for r in self.running:
            seqs[self.kv.shard_of(r)] += 1
        closed = [
            b <= 0 or n >= self.config.max_num_seqs for b, n in zip(budgets, seqs, strict=True)
        ]
        i = 0
        while i < len(self.waiting) and not all(closed):
            req = self.waiting[i]
            d = self.kv.shard_of(req)
            if closed[d]:
                i += 1
                continue
            if req.num_computed_tokens == 0:
                req.num_computed_tokens = req.num_cached_prompt_tokens = self.kv.match_prefix(req)
            n = self._chunk_size(req, budgets[d])
            reserve = self._admission_reservation(req, n)
            if n == 0 or not self._can_admit(req, reserve):
                closed[d] = True  # the head waits for memory; nobody overtakes it
                i += 1
                continue
            self.kv.grow(req, reserve)
            self.waiting.pop(i)
            self._requeued.discard(req.request_id)
            self._admissions += 1
            self._admitted_at[req.request_id] = self._admissions
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            plan.seqs.append(ScheduledSeq(req, n))
            budgets[d] -= n
            seqs[d] += 1
            closed[d] = budgets[d] <= 0 or seqs[d] >= self.config.max_num_seqs

    def _can_admit(self, req: Request, reserve: int) -> bool:
        """The pool holds `req`'s next chunk (`reserve` tokens), and, when anything runs, also
        the projected growth of `req` and of the running requests at least as urgent as it
        (less urgent ones would be preempted for it anyway) plus the watermark. A preempted
        request is projected at ratio 1: it comes back only when everyone fits in full."""
        if not self.kv.can_grow(req, reserve):
            return False
        d = self.kv.shard_of(req)
        peers = [r for r in self.running if r.priority <= req.priority and self.kv.shard_of(r) == d]
        if not peers or self.config.reserve_full_length:
            return True
        ratio = 1.0 if req.request_id in self._requeued else self.growth_ratio
        blocks = self.kv.blocks_of(req)
        pages = blocks.pages_needed(req.request_id, self._projected(req, reserve, ratio))
        for r in peers:
            held = blocks.num_tokens(r.request_id) if blocks.has_seq(r.request_id) else 0
            pages += blocks.pages_needed(r.request_id, self._projected(r, held, ratio))
        watermark = int(WATERMARK * blocks.num_usable_pages)
        return blocks.can_allocate(pages + watermark)

    @staticmethod
    def _projected(req: Request, held_tokens: int, ratio: float) -> int:
        """Tokens `req` is expected to need: what it holds plus `ratio` of the rest of its
        possible length (prompt + max_tokens)."""
        full = len(req.prompt_token_ids) + req.params.max_tokens
        return held_tokens + int(ratio * max(0, full - held_tokens) + 0.999)

    def _admission_reservation(self, req: Request, num_new_tokens: int) -> int:
        """Tokens of KV to hold at admission: just this chunk (paged), or the request's whole
        possible length (`reserve_full_length`: the pre-paging contiguous design, a baseline)."""
        if self.config.reserve_full_length:
            return len(req.prompt_token_ids) + req.params.max_tokens
        return req.num_computed_tokens + num_new_tokens

    def _preempt(self, victim: Request, plan: SchedulePlan) -> None:
        self.running.remove(victim)
        plan.seqs[:] = [s for s in plan.seqs if s.request is not victim]
        self.kv.preempt(victim)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.growth_ratio = 1.0  # the load needs its full length: admit conservatively
        self._admitted_at.pop(victim.request_id, None)
        self._requeued.add(victim.request_id)
        self._enqueued_at[victim.request_id] = self.step_index
        self.waiting.append(victim)
        plan.preempted.append(victim)

    # --- results --------------------------------------------------------------------------------

    def update(self, plan: StepPlan, sampled: list[tuple[int, float]]) -> list[Request]:
        """`advance` then `resolve`: the synchronous loop's one call per step."""
        self.advance(plan)
        return [req for req, _ in self.resolve(plan, sampled)]

    def advance(self, plan: StepPlan) -> None:
        """The step is dispatched: its tokens count as computed, and each sampling sequence gets
        a `PENDING_TOKEN` output slot, so the next step can be scheduled before the device's
        results are read (the slot's token then comes from the device, see `batch.py`)."""
        for s in plan.seqs:
            req = self._live.get(s.request_id)
            if req is None:
                continue
            req.num_computed_tokens += s.num_new_tokens
            if s.samples:
                req.output_token_ids.append(PENDING_TOKEN)
                req.output_logprobs.append(math.nan)

    def resolve(
        self, plan: StepPlan, sampled: list[tuple[int, float]]
    ) -> list[tuple[Request, int]]:
        """The step's results are read: fill each sampled slot, publish completed blocks (only
        now: their tokens are known). Returns (request, output index of its new token) in plan
        order. A request removed since `plan` was scheduled (finished, aborted) is skipped."""
        got_token = []
        for s, (token, logprob) in zip(plan.seqs, sampled, strict=True):
            req = self._live.get(s.request_id)
            if req is None or req.arrival_order != s.arrival_order:
                continue  # finished or aborted since (its id may already name a new request)
            if s.samples:
                index = s.start + s.num_new_tokens - len(req.prompt_token_ids)
                req.set_output_token(index, token, logprob)
                got_token.append((req, index))
            self.kv.commit_computed(req)
        return got_token
