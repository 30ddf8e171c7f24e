"""Host-side scheduler: continuous batching, chunked prefill, priorities, preemption by recompute.

`schedule()` returns a `SchedulePlan` (which requests run this step and how many of their tokens);
`update(plan, sampled)` folds the device's results back in and returns the requests that produced
a token. The scheduler sees KV memory only through `KVCacheManager`; it knows nothing of devices,
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
  * when a running request needs a page and none is free, the victim is the least urgent, most
    recently arrived running request — never one more urgent than the request that needs the
    page (then that request itself yields). The victim's pages are freed (cached blocks stay
    cached where their scope allows) and it re-enters the queue ahead of its class.
"""

from __future__ import annotations

import dataclasses
import time

from pijax.config import SchedulerConfig
from pijax.kv_cache_manager import KVCacheManager
from pijax.request import Request, RequestStatus


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

    # --- queue ----------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        self._enqueued_at[request.request_id] = self.step_index

    def remove(self, request: Request, *, keep_session: bool = False) -> None:
        """Drop a request wherever it is and release its pages (finish or abort)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._enqueued_at.pop(request.request_id, None)
        self._requeued.discard(request.request_id)
        self.kv.finish(request, keep_session=keep_session)

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

    def schedule(self) -> SchedulePlan:
        self.step_index += 1
        plan = SchedulePlan(seqs=[], preempted=[])
        budget = self._schedule_running(plan, self.config.max_num_batched_tokens)
        if not plan.preempted:
            self._admit_waiting(plan, budget)
        now = time.monotonic()
        for s in plan.seqs:
            if s.request.timings.first_scheduled is None:
                s.request.timings.first_scheduled = now
        return plan

    def _chunk_size(self, req: Request, budget: int) -> int:
        n = req.num_uncomputed_tokens
        if not self.config.enable_chunked_prefill and n > budget:
            return 0  # without chunking a prefill runs whole or waits
        return min(n, budget)

    def _schedule_running(self, plan: SchedulePlan, budget: int) -> int:
        self.running.sort(key=lambda r: (r.priority, r.arrival_order))
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk_size(req, budget)
            if n == 0:
                i += 1
                continue
            total = req.num_computed_tokens + n
            if not self.kv.can_grow(req, total):
                victim = self._pick_victim(req)
                budget += sum(s.num_new_tokens for s in plan.seqs if s.request is victim)
                self._preempt(victim, plan)
                if victim is req:
                    continue  # `req` left the list; the next request moved into slot i
                if self.running.index(req) < i:
                    i -= 1
                continue  # retry `req` with the freed pages
            self.kv.grow(req, total)
            plan.seqs.append(ScheduledSeq(req, n))
            budget -= n
            i += 1
        return budget

    def _pick_victim(self, needy: Request) -> Request:
        """Least urgent, most recently arrived running request; never more urgent than `needy`."""
        victim = max(self.running, key=lambda r: (r.priority, r.arrival_order))
        return victim if victim.priority >= needy.priority else needy

    def _admit_waiting(self, plan: SchedulePlan, budget: int) -> None:
        self.waiting.sort(key=self._queue_key)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_computed_tokens == 0:
                req.num_computed_tokens = req.num_cached_prompt_tokens = self.kv.match_prefix(req)
            n = self._chunk_size(req, budget)
            reserve = self._admission_reservation(req, n)
            if n == 0 or not self.kv.can_grow(req, reserve):
                break  # the head waits for memory; nobody overtakes it
            self.kv.grow(req, reserve)
            self.waiting.pop(0)
            self._requeued.discard(req.request_id)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            plan.seqs.append(ScheduledSeq(req, n))
            budget -= n

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
        self._requeued.add(victim.request_id)
        self._enqueued_at[victim.request_id] = self.step_index
        self.waiting.append(victim)
        plan.preempted.append(victim)

    # --- results --------------------------------------------------------------------------------

    def update(self, plan: SchedulePlan, sampled: list[tuple[int, float]]) -> list[Request]:
        """Advance computed counts, publish completed blocks, append each sampled token.
        Returns the requests that got a token, in plan order."""
        got_token = []
        for s, (token, logprob) in zip(plan.seqs, sampled, strict=True):
            req = s.request
            samples = s.samples
            req.num_computed_tokens += s.num_new_tokens
            self.kv.commit_computed(req)
            if samples:
                req.output_token_ids.append(token)
                req.output_logprobs.append(logprob)
                got_token.append(req)
        return got_token
