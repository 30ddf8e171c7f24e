"""Host-side scheduler: continuous batching with chunked prefill and preemption by recompute.

`schedule()` returns a `SchedulePlan` (which requests run this step and how many of their tokens);
`update(plan, sampled)` folds the device's results back in and returns the requests that
produced a token. The scheduler knows pages only through the `BlockManager`; it knows nothing of
devices, tokenizers or the network.

Policy, each in its own small method:
  * running requests are served first, in admission order, one decode token each or the next
    prefill chunk, so a long prompt never stalls its decoding neighbours by more than one step;
  * the rest of the step's token budget admits waiting requests (first come, first served);
  * when a running request needs a page and none is free, the most recently admitted running
    request is preempted: its pages are freed and it goes back to the front of the queue, to be
    recomputed later (its output so far is kept and becomes part of what it recomputes).
"""

from __future__ import annotations

import collections
import dataclasses
import time

from pijax.block_manager import BlockManager
from pijax.config import SchedulerConfig
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
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # --- queue ----------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Drop a request wherever it is and free its pages (abort, or finish)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if self.blocks.has_seq(request.request_id):
            self.blocks.free(request.request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # --- scheduling -----------------------------------------------------------------------------

    def schedule(self) -> SchedulePlan:
        budget = self.config.max_num_batched_tokens
        plan = SchedulePlan(seqs=[], preempted=[])
        budget = self._schedule_running(plan, budget)
        if not plan.preempted:
            self._admit_waiting(plan, budget)
        now = time.monotonic()
        for s in plan.seqs:
            if s.request.timings.first_scheduled is None:
                s.request.timings.first_scheduled = now
        return plan

    def _chunk_size(self, request: Request, budget: int) -> int:
        n = request.num_uncomputed_tokens
        if not self.config.enable_chunked_prefill and n > budget:
            return 0  # without chunking a prefill runs whole or waits
        return min(n, budget)

    def _schedule_running(self, plan: SchedulePlan, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk_size(req, budget)
            if n == 0:
                i += 1
                continue
            if not self._reserve(req, n):
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is req:
                    break
                continue  # retry the same request with the freed pages
            plan.seqs.append(ScheduledSeq(req, n))
            budget -= n
            i += 1
        return budget

    def _admit_waiting(self, plan: SchedulePlan, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = self._chunk_size(req, budget)
            if n == 0 or not self._reserve(req, n):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            plan.seqs.append(ScheduledSeq(req, n))
            budget -= n

    def _reserve(self, req: Request, num_new_tokens: int) -> bool:
        total = req.num_computed_tokens + num_new_tokens
        if not self.blocks.can_allocate(self.blocks.pages_needed(req.request_id, total)):
            return False
        self.blocks.ensure_capacity(req.request_id, total)
        return True

    def _preempt(self, victim: Request, plan: SchedulePlan) -> None:
        self.running.remove(victim)
        plan.seqs[:] = [s for s in plan.seqs if s.request is not victim]
        self.blocks.free(victim.request_id)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        plan.preempted.append(victim)

    # --- results --------------------------------------------------------------------------------

    def update(self, plan: SchedulePlan, sampled: list[tuple[int, float]]) -> list[Request]:
        """Advance computed counts; append each sampled token. Returns requests that got one."""
        got_token = []
        for s, (token, logprob) in zip(plan.seqs, sampled, strict=True):
            req = s.request
            samples = s.samples
            req.num_computed_tokens += s.num_new_tokens
            if samples:
                req.output_token_ids.append(token)
                req.output_logprobs.append(logprob)
                got_token.append(req)
        return got_token
