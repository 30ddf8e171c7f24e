"""The scheduler's one view of KV memory: pages, trust-zone prefix reuse and sessions together.

The scheduler asks four questions of it — how much of this request is already cached, can this
request grow by n tokens, which blocks did it just complete, and what happens to its pages when it
ends — and knows nothing of hashes, scopes, refcounts or sessions. Those live in
`block_manager.py` (pages), `prefix_cache.py` (hash chains with scope keys, LRU of unreferenced
blocks, audit log) and `sessions.py` (pinned turns).

Scope keys are always derived here from the authenticated tenant the caller passed in and the
request's declared segment scopes — never from anything a client could use as a salt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pijax.audit import AuditLog
from pijax.block_manager import BlockManager
from pijax.prefix_cache import BlockInfo, PrefixCache
from pijax.request import Request, Scope
from pijax.sessions import SessionStore


def _store_id(tenant: str, session_id: str) -> str:
    """Session ids are the client's names, unique only within a tenant: the store is keyed by
    both, so another tenant's use of the same id is a different session, not a collision."""
    return f"{len(tenant)}:{tenant}/{session_id}"


@dataclasses.dataclass
class CacheState:
    """Per-request bookkeeping: the resolved blocks of its prompt and how many are committed."""

    segments: list[tuple[list[int], Scope]]
    permitted_zones: frozenset[str]
    infos: list[BlockInfo | None]
    num_committed_blocks: int = 0


class KVCacheManager:
    def __init__(
        self,
        blocks: BlockManager,
        *,
        enable_prefix_reuse: bool = True,
        audit: AuditLog | None = None,
        session_ttl_s: float = 600.0,
        session_max_pages: int | None = None,
    ):
        self.blocks = blocks
        self.page_size = blocks.page_size
        self.audit = audit if audit is not None else AuditLog()
        self.enable_prefix_reuse = enable_prefix_reuse
        self.prefix_cache = PrefixCache(blocks, self.audit)
        self.sessions = SessionStore(
            blocks,
            ttl_s=session_ttl_s,
            audit=self.audit,
            max_pages=session_max_pages
            if session_max_pages is not None
            else max(1, blocks.num_usable_pages // 4),
        )
        self._state: dict[str, CacheState] = {}

    # --- requests -------------------------------------------------------------------------------

    def register(
        self,
        req: Request,
        segments: Sequence[tuple[Sequence[int], Scope]],
        permitted_zones: frozenset[str],
    ) -> None:
        """Resolve a new request's block scopes (validates session scopes; raises on misuse)."""
        segs = [(list(t), s) for t, s in segments]
        infos = self.prefix_cache.resolve_blocks(
            segs, tenant=req.tenant, session_id=req.session_id, permitted_zones=permitted_zones
        )
        self._state[req.request_id] = CacheState(segs, permitted_zones, infos)
        if req.session_id is not None:
            self.sessions.touch(
                req.tenant, _store_id(req.tenant, req.session_id), request_id=req.request_id
            )

    def match_prefix(self, req: Request) -> int:
        """Attach the longest reusable cached prefix to a request about to start; returns the
        number of tokens it need not compute. At least one prompt token is always left to compute
        (its logits start generation), so the matched blocks never include the last token."""
        st = self._state.get(req.request_id)
        if not self.enable_prefix_reuse or st is None or req.num_computed_tokens:
            return 0
        max_blocks = (req.num_tokens - 1) // self.page_size
        pages = self.prefix_cache.match(
            st.infos[:max_blocks], request_id=req.request_id, tenant=req.tenant
        )
        if not pages:
            return 0
        self.blocks.attach(req.request_id, pages)
        st.num_committed_blocks = len(pages)
        return len(pages) * self.page_size

    def can_grow(self, req: Request, num_tokens: int) -> bool:
        return self.blocks.can_allocate(self.blocks.pages_needed(req.request_id, num_tokens))

    def grow(self, req: Request, num_tokens: int) -> None:
        self.blocks.ensure_capacity(req.request_id, num_tokens)

    def commit_computed(self, req: Request) -> None:
        """Publish the request's newly completed full blocks to the prefix cache (only blocks
        whose scope allows reuse), so concurrent requests can share them at once."""
        st = self._state.get(req.request_id)
        if st is None or not self.enable_prefix_reuse:
            return
        full = min(req.num_computed_tokens // self.page_size, len(st.infos))
        if full <= st.num_committed_blocks:
            return
        table = self.blocks.block_table(req.request_id)
        for i in range(st.num_committed_blocks, full):
            info = st.infos[i]
            if info is None:  # private from here on: nothing later is cacheable either
                st.num_committed_blocks = len(st.infos)
                return
            self.prefix_cache.insert(info, table[i])
        st.num_committed_blocks = full

    def preempt(self, req: Request) -> None:
        """Free the request's pages for recompute; cached blocks stay cached (evictable)."""
        if self.blocks.has_seq(req.request_id):
            self.blocks.free(req.request_id)
        st = self._state.get(req.request_id)
        if st is not None:
            st.num_committed_blocks = 0

    def finish(self, req: Request, *, keep_session: bool) -> None:
        """A request ended. A finished session turn pins its full blocks (prompt + output, under
        the session's scope) so the next turn prefills only new tokens."""
        st = self._state.pop(req.request_id, None)
        if not self.blocks.has_seq(req.request_id):
            return
        if (
            keep_session
            and req.session_id is not None
            and st is not None
            and self.enable_prefix_reuse
        ):
            pages = self._session_blocks(req, st)
            if pages:
                self.sessions.retain(
                    req.tenant,
                    _store_id(req.tenant, req.session_id),
                    pages,
                    len(pages) * self.page_size,
                )
        self.blocks.free(req.request_id)

    def _session_blocks(self, req: Request, st: CacheState) -> list[int]:
        computed = req.all_token_ids[: req.num_computed_tokens]
        infos = self.prefix_cache.resolve_blocks(
            st.segments,
            tenant=req.tenant,
            session_id=req.session_id,
            permitted_zones=st.permitted_zones,
            extra_tokens=computed[sum(len(t) for t, _ in st.segments) :],
        )
        table = self.blocks.block_table(req.request_id)
        pages = []
        for i, info in enumerate(infos[: req.num_computed_tokens // self.page_size]):
            if info is None:
                break
            self.prefix_cache.insert(info, table[i])
            pages.append(table[i])
        return pages

    # --- engine-level operations ---------------------------------------------------------------

    def register_trusted_prefix(self, zone: str, tokens: Sequence[int], source: str) -> None:
        self.prefix_cache.register_trusted_prefix(zone, tokens, source=source)

    def end_session(self, tenant: str, session_id: str) -> bool:
        return self.sessions.end(tenant, _store_id(tenant, session_id))

    def has_session(self, tenant: str, session_id: str) -> bool:
        return self.sessions.owner_of(_store_id(tenant, session_id)) == tenant

    def housekeeping(self) -> None:
        self.sessions.evict_expired()

    def clear(self) -> int:
        return self.prefix_cache.clear()
