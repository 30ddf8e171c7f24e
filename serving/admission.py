"""Per-tenant caps on expensive preparation (tokenizing, grammar compilation), off the event loop.

    gate = TenantGate("tokenize", per_tenant=2, max_waiting=8)
    async with gate.slot(principal.tenant):
        ids = await run_off_loop(executor, tokenizer.encode, text)

A tenant holds at most `per_tenant` slots at once; up to `max_waiting` more of its calls wait
for one, and past that a call is refused at once with RESOURCE_EXHAUSTED, so one tenant can
neither occupy every worker nor pile up unbounded waiting requests (each holding its message).
The work itself runs on a small dedicated thread pool, never on the event loop that serves
everyone. What it knows nothing about: what the work is.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

import grpc

from pijax.serving.validation import RequestError


class TenantGate:
    def __init__(self, what: str, per_tenant: int, max_waiting: int):
        if per_tenant < 1 or max_waiting < 0:
            raise ValueError(
                f"per_tenant must be >= 1 and max_waiting >= 0; got {per_tenant}, {max_waiting}"
            )
        self.what = what
        self.per_tenant = per_tenant
        self.max_waiting = max_waiting
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._waiting: collections.Counter[str] = collections.Counter()
        self._held: collections.Counter[str] = collections.Counter()

    def in_use(self, tenant: str) -> int:
        return self._held[tenant]

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str):
        sem = self._sems.get(tenant)
        if sem is None:
            sem = self._sems[tenant] = asyncio.Semaphore(self.per_tenant)
        if sem.locked() and self._waiting[tenant] >= self.max_waiting:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many concurrent {self.what} calls for this tenant (at most "
                f"{self.per_tenant} running and {self.max_waiting} waiting); retry later",
            )
        self._waiting[tenant] += 1
        try:
            await sem.acquire()
        finally:
            self._waiting[tenant] -= 1
        self._held[tenant] += 1
        try:
            yield
        finally:
            self._held[tenant] -= 1
            sem.release()
            if not self._held[tenant] and not self._waiting[tenant]:
                self._sems.pop(tenant, None)  # bounded by tenants with work in progress
                del self._held[tenant]
                self._waiting.pop(tenant, None)
