"""Session KV retention: a finished turn's pages stay pinned so the next turn prefills only new
tokens.

When a turn of a session ends, the engine has inserted the turn's full blocks into the prefix
cache under `session:<id>` and hands their pages to `retain`, which takes one reference on each
(`BlockManager.incref`). The next turn's prompt (previous prompt + output + new text) then
matches those blocks in the prefix cache. The pins are dropped deliberately: after an idle TTL,
to keep all sessions under an LRU cap on the pages they hold (so sessions cannot starve new
work), or by an explicit end. Unpinned pages are ordinary cached pages again: held and evicted
LRU by the prefix cache, unless something else still references them.

Invariants (checked by `check_invariants`):

- A session id has one owner tenant; every call names the tenant and acts only on that tenant's
  sessions.
- Each session pins distinct pages; `_pins[p]` is the number of sessions pinning page `p`, and
  `blocks.refcount(p) >= _pins[p]`.
- The distinct pinned pages never exceed `max_pages`, and the pages pinned by one tenant's
  sessions (counted per session) never exceed `max_pages_per_tenant`.
- Fairness between tenants: a tenant over its own cap evicts its own least recently used
  sessions; when all sessions together are over `max_pages`, the victim is the least recently
  used session of the tenant holding the most pages, so one tenant's new sessions never evict
  a lighter tenant's pinned KV.
- Sessions are kept in least-recently-used order (retain and touch make one most recent).

What it knows nothing about: hashes and scopes (the prefix cache), requests, or devices.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence

from pijax.audit import AuditLog
from pijax.block_manager import BlockManager
from pijax.request import InvalidRequestError


@dataclasses.dataclass
class _Session:
    tenant: str
    pages: list[int]  # pinned, in token order: the turn's first len(pages) full blocks
    num_tokens: int  # tokens of the finished turn (prompt + output)
    last_used: float


class SessionStore:
    """A finished turn's KV stays pinned under session:<id> so the next turn prefills only new
    tokens. Evicted deliberately: idle TTL, an LRU cap on the pages all sessions may hold,
    explicit end. See the module docstring for the invariants."""

    def __init__(
        self,
        blocks: BlockManager,
        *,
        ttl_s: float = 600.0,
        max_pages: int,
        max_pages_per_tenant: int | None = None,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0; got {ttl_s}")
        if max_pages < 0:
            raise ValueError(f"max_pages must be >= 0; got {max_pages}")
        self.blocks = blocks
        self.ttl_s = ttl_s
        self.max_pages = max_pages
        if max_pages_per_tenant is not None and max_pages_per_tenant < 0:
            raise ValueError(
                f"max_pages_per_tenant must be None or >= 0; got {max_pages_per_tenant}"
            )
        self.max_pages_per_tenant = (
            max_pages if max_pages_per_tenant is None else max_pages_per_tenant
        )
        self._tenant_pages: collections.Counter[str] = collections.Counter()
        self.audit = audit
        self.clock = clock
        self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
        self._pins: collections.Counter[int] = collections.Counter()

    # ---- turns --------------------------------------------------------------------------------

    def retain(self, tenant: str, session_id: str, pages: Sequence[int], num_tokens: int) -> None:
        """Pin the full pages of a finished turn and release the previous turn's pins.

        `pages` is the turn's block table (or its first full pages); only the first
        `num_tokens // page_size` are pinned, and at most `max_pages` of them. Call it while the
        turn's seq still holds the pages (before `blocks.free`). Other sessions are then evicted,
        least recently used first, until all sessions hold at most `max_pages` pages.
        """
        session = self._sessions.get(session_id)
        if session is not None and session.tenant != tenant:
            raise InvalidRequestError(
                f"session_id must name a session of tenant {tenant!r}; got {session_id!r}"
            )
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0; got {num_tokens}")
        num_full = num_tokens // self.blocks.page_size
        if len(pages) < num_full:
            raise ValueError(f"{num_tokens} tokens fill {num_full} pages; got {len(pages)} pages")
        cap = min(self.max_pages, self.max_pages_per_tenant)
        keep = [int(p) for p in pages[: min(num_full, cap)]]
        if len(set(keep)) != len(keep):
            raise ValueError(f"pages must be distinct; got {keep}")
        # Pin the new turn before unpinning the old one: pages shared by both never reach
        # refcount 0 in between (an uncached one would go to the free list).
        for i, page in enumerate(keep):
            try:
                self.blocks.incref(page)
            except ValueError:
                for pinned in reversed(keep[:i]):
                    self.blocks.decref(pinned)
                raise
        if session is not None:
            self._remove(session_id)
        self._sessions[session_id] = _Session(tenant, keep, num_tokens, self.clock())
        self._pins.update(keep)
        self._tenant_pages[tenant] += len(keep)
        if num_full > len(keep):
            self._audit(
                "session_evict",
                tenant,
                session_id,
                reason="over_cap",
                num_pages=num_full - len(keep),
                num_tokens=num_tokens,
            )
        while len(self._pins) > self.max_pages:
            self._evict(self._lru_of_heaviest(exclude=session_id), "lru_cap")
        while self._tenant_pages[tenant] > self.max_pages_per_tenant:
            own = (sid for sid, s in self._sessions.items() if s.tenant == tenant)
            self._evict(next(sid for sid in own if sid != session_id), "tenant_cap")

    def _lru_of_heaviest(self, exclude: str) -> str:
        """The least recently used session of the tenant pinning the most pages."""
        others = [(sid, s.tenant) for sid, s in self._sessions.items() if sid != exclude]
        heaviest = max({t for _, t in others}, key=lambda t: (self._tenant_pages[t], t))
        return next(sid for sid, t in others if t == heaviest)

    def touch(self, tenant: str, session_id: str, *, request_id: str | None = None) -> bool:
        """A new turn arrived: refresh the session's TTL and LRU position.

        False if the session is unknown, another tenant's, or idle past its TTL (then it is
        evicted now rather than revived). With `request_id`, audits a "session_reuse" record.
        """
        session = self._sessions.get(session_id)
        if session is None or session.tenant != tenant:
            return False
        now = self.clock()
        if now - session.last_used > self.ttl_s:
            self._evict(session_id, "ttl")
            return False
        session.last_used = now
        self._sessions.move_to_end(session_id)
        if request_id is not None:
            self._audit(
                "session_reuse",
                tenant,
                session_id,
                request_id=request_id,
                num_pages=len(session.pages),
                num_tokens=session.num_tokens,
            )
        return True

    def end(self, tenant: str, session_id: str) -> bool:
        """Explicit end: unpin and forget the session. False if unknown or another tenant's."""
        session = self._sessions.get(session_id)
        if session is None or session.tenant != tenant:
            return False
        self._remove(session_id)
        self._audit(
            "session_end",
            tenant,
            session_id,
            num_pages=len(session.pages),
            num_tokens=session.num_tokens,
        )
        return True

    def end_all(self) -> int:
        """End every session (shutdown, tests); return how many."""
        ids = list(self._sessions)
        for session_id in ids:
            self.end(self._sessions[session_id].tenant, session_id)
        return len(ids)

    def evict_expired(self) -> int:
        """Unpin sessions idle for more than `ttl_s`; return how many sessions were evicted."""
        now = self.clock()
        expired = []
        for session_id, session in self._sessions.items():  # oldest first
            if now - session.last_used <= self.ttl_s:
                break
            expired.append(session_id)
        for session_id in expired:
            self._evict(session_id, "ttl")
        return len(expired)

    # ---- queries ------------------------------------------------------------------------------

    def num_pages_of_tenant(self, tenant: str) -> int:
        return self._tenant_pages[tenant]

    def num_pages_held(self) -> int:
        """Distinct pages pinned by all sessions together (what `max_pages` caps)."""
        return len(self._pins)

    def num_sessions(self) -> int:
        return len(self._sessions)

    def owner_of(self, session_id: str) -> str | None:
        """The tenant owning `session_id`, or None (so the server can answer NOT_FOUND)."""
        session = self._sessions.get(session_id)
        return None if session is None else session.tenant

    def pages_of(self, tenant: str, session_id: str) -> list[int]:
        """Pages pinned for the tenant's session, in token order ([] if none or not its own)."""
        session = self._sessions.get(session_id)
        return [] if session is None or session.tenant != tenant else list(session.pages)

    def pinned_pages(self) -> frozenset[int]:
        return frozenset(self._pins)

    def check_invariants(self) -> None:
        """Assert the invariants of the module docstring."""
        pins: collections.Counter[int] = collections.Counter()
        last = float("-inf")
        for session_id, session in self._sessions.items():
            assert len(set(session.pages)) == len(session.pages), (
                f"session {session_id!r} pins a page twice"
            )
            assert session.last_used >= last, "sessions are out of LRU order"
            last = session.last_used
            pins.update(session.pages)
        assert dict(pins) == dict(self._pins), "pin counts are stale"
        per_tenant: collections.Counter[str] = collections.Counter()
        for session in self._sessions.values():
            per_tenant[session.tenant] += len(session.pages)
        assert +per_tenant == +self._tenant_pages, "per-tenant page counts are stale"
        assert all(n <= self.max_pages_per_tenant for n in per_tenant.values()), (
            f"a tenant pins more than max_pages_per_tenant={self.max_pages_per_tenant}"
        )
        assert len(self._pins) <= self.max_pages, (
            f"sessions hold {len(self._pins)} pages > max_pages {self.max_pages}"
        )
        for page, count in self._pins.items():
            assert self.blocks.refcount(page) >= count, (
                f"page {page} pinned {count} times has refcount {self.blocks.refcount(page)}"
            )

    # ---- internals ----------------------------------------------------------------------------

    def _evict(self, session_id: str, reason: str) -> None:
        session = self._sessions[session_id]
        self._remove(session_id)
        self._audit(
            "session_evict",
            session.tenant,
            session_id,
            reason=reason,
            num_pages=len(session.pages),
            num_tokens=session.num_tokens,
        )

    def _remove(self, session_id: str) -> None:
        session = self._sessions.pop(session_id)
        self._tenant_pages[session.tenant] -= len(session.pages)
        if self._tenant_pages[session.tenant] <= 0:
            del self._tenant_pages[session.tenant]
        self._unpin(session)

    def _unpin(self, session: _Session) -> None:
        # Tail first, like BlockManager.free, so the prefix cache's LRU evicts a chain's end
        # before its beginning.
        for page in reversed(session.pages):
            self._pins[page] -= 1
            if not self._pins[page]:
                del self._pins[page]
            self.blocks.decref(page)

    def _audit(self, kind: str, tenant: str, session_id: str, **fields) -> None:
        if self.audit is not None:
            self.audit.append(kind, tenant=tenant, session_id=session_id, **fields)
