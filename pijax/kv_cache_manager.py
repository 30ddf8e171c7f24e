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
from pijax.prefix_cache import BlockInfo, PrefixCache, PrefixCacheStats
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

    # --- data shards (one here; `DataShardedKV` has several) ------------------------------------

    num_shards = 1

    def shard_of(self, req: Request) -> int:
        return 0

    def blocks_of(self, req: Request) -> BlockManager:
        return self.blocks

    # --- requests -------------------------------------------------------------------------------

    def register(
        self,
        req: Request,
        segments: Sequence[tuple[Sequence[int], Scope]],
        permitted_zones: frozenset[str],
        infos: list[BlockInfo | None] | None = None,
    ) -> None:
        """Resolve a new request's block scopes (validates session scopes; raises on misuse).
        `infos`: the blocks already resolved (`DataShardedKV`, which resolved them to place the
        request; resolving is a pure function of the request and the shared registry)."""
        segs = [(list(t), s) for t, s in segments]
        if infos is None:
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

    def prefix_stats(self) -> PrefixCacheStats:
        return self.prefix_cache.stats()

    def num_session_pages(self) -> int:
        return self.sessions.num_pages_held()


class DataShardedKV:
    """KV memory of an engine whose pool is split over the mesh's `data` axis: one
    `KVCacheManager` (block manager, prefix cache, sessions) per data shard, each over its own
    page range, and the placement of every request on one of them.

    The scheduler sees the `KVCacheManager` interface; every per-request call goes to the
    request's shard. Placement (at `register`, fixed for the request's life, preemption
    included):

    1. a session's turn goes where the session's pinned KV is (or where its other live turns
       are), so session reuse still hits;
    2. otherwise the shard caching the longest prefix of the request's blocks (a shared-zone
       policy prefix, say), when any caches one;
    3. otherwise the least loaded shard: the fewest tokens of projected demand (prompt +
       max_tokens) of the requests placed there plus the tokens its sessions pin, ties to the
       lower index.

    Trusted prefixes are registered (and audited) once; the shards share the registry. The
    shards share one audit log.
    """

    def __init__(self, shards: Sequence[KVCacheManager]):
        if len(shards) < 2:
            raise ValueError(f"DataShardedKV needs >= 2 shards; got {len(shards)}")
        self.shards = list(shards)
        self.num_shards = len(self.shards)
        self.page_size = shards[0].page_size
        self.audit = shards[0].audit
        self.enable_prefix_reuse = shards[0].enable_prefix_reuse
        for s in self.shards[1:]:
            s.prefix_cache.share_registry(self.shards[0].prefix_cache)
        self._placement: dict[str, int] = {}  # live request id -> shard
        self._load = [0] * self.num_shards  # projected tokens of the requests placed there
        self._demand: dict[str, int] = {}
        self._session_turns: dict[str, list[int]] = {}  # store id -> [shard, live turns]

    # --- placement ------------------------------------------------------------------------------

    def shard_of(self, req: Request) -> int:
        return self._placement[req.request_id]

    def blocks_of(self, req: Request) -> BlockManager:
        return self.shards[self.shard_of(req)].blocks

    def _place(self, req: Request, infos: list[BlockInfo | None]) -> int:
        if req.session_id is not None:
            key = _store_id(req.tenant, req.session_id)
            for d, s in enumerate(self.shards):
                if s.has_session(req.tenant, req.session_id):
                    return d
            if key in self._session_turns:
                return self._session_turns[key][0]
        if self.enable_prefix_reuse:
            cached = [s.prefix_cache.num_cached_blocks_of(infos) for s in self.shards]
            if max(cached) > 0:
                return max(range(self.num_shards), key=lambda d: (cached[d], -self._load_of(d)))
        return min(range(self.num_shards), key=lambda d: (self._load_of(d), d))

    def _load_of(self, d: int) -> int:
        return self._load[d] + self.shards[d].sessions.num_pages_held() * self.page_size

    def register(
        self,
        req: Request,
        segments: Sequence[tuple[Sequence[int], Scope]],
        permitted_zones: frozenset[str],
    ) -> None:
        infos = self.shards[0].prefix_cache.resolve_blocks(  # may refuse a bad scope
            [(list(t), s) for t, s in segments],
            tenant=req.tenant,
            session_id=req.session_id,
            permitted_zones=permitted_zones,
        )
        d = self._place(req, infos)
        self.shards[d].register(req, segments, permitted_zones, infos)
        demand = len(req.prompt_token_ids) + req.params.max_tokens
        self._placement[req.request_id] = d
        self._demand[req.request_id] = demand
        self._load[d] += demand
        if req.session_id is not None:
            turns = self._session_turns.setdefault(_store_id(req.tenant, req.session_id), [d, 0])
            turns[1] += 1

    def _unplace(self, req: Request) -> None:
        d = self._placement.pop(req.request_id, None)
        if d is None:
            return
        self._load[d] -= self._demand.pop(req.request_id)
        if req.session_id is not None:
            key = _store_id(req.tenant, req.session_id)
            turns = self._session_turns[key]
            turns[1] -= 1
            if not turns[1]:
                del self._session_turns[key]

    # --- the scheduler's calls, on the request's shard ------------------------------------------

    def match_prefix(self, req: Request) -> int:
        return self.shards[self.shard_of(req)].match_prefix(req)

    def can_grow(self, req: Request, num_tokens: int) -> bool:
        return self.shards[self.shard_of(req)].can_grow(req, num_tokens)

    def grow(self, req: Request, num_tokens: int) -> None:
        self.shards[self.shard_of(req)].grow(req, num_tokens)

    def commit_computed(self, req: Request) -> None:
        self.shards[self.shard_of(req)].commit_computed(req)

    def preempt(self, req: Request) -> None:
        self.shards[self.shard_of(req)].preempt(req)

    def finish(self, req: Request, *, keep_session: bool) -> None:
        d = self._placement.get(req.request_id)
        if d is None:
            return
        self.shards[d].finish(req, keep_session=keep_session)
        self._unplace(req)

    # --- engine-level operations, on every shard ------------------------------------------------

    def register_trusted_prefix(self, zone: str, tokens: Sequence[int], source: str) -> None:
        self.shards[0].register_trusted_prefix(zone, tokens, source)  # the registry is shared

    def end_session(self, tenant: str, session_id: str) -> bool:
        return any([s.end_session(tenant, session_id) for s in self.shards])

    def has_session(self, tenant: str, session_id: str) -> bool:
        return any(s.has_session(tenant, session_id) for s in self.shards)

    def housekeeping(self) -> None:
        for s in self.shards:
            s.housekeeping()

    def clear(self) -> int:
        return sum(s.clear() for s in self.shards)

    def prefix_stats(self) -> PrefixCacheStats:
        stats = [s.prefix_cache.stats() for s in self.shards]
        merged = stats[0]
        for st in stats[1:]:
            merged = merge_prefix_stats(merged, st)
        return merged

    def num_session_pages(self) -> int:
        return sum(s.sessions.num_pages_held() for s in self.shards)


def merge_prefix_stats(a: PrefixCacheStats, b: PrefixCacheStats) -> PrefixCacheStats:
    """Two shards' counters as one (the registry is shared, so its count is not summed)."""

    def add(x: dict[str, int], y: dict[str, int]) -> dict[str, int]:
        return {k: x.get(k, 0) + y.get(k, 0) for k in {**x, **y}}

    return PrefixCacheStats(
        queries_by_zone=add(a.queries_by_zone, b.queries_by_zone),
        hits_by_zone=add(a.hits_by_zone, b.hits_by_zone),
        tokens_saved=a.tokens_saved + b.tokens_saved,
        num_cached_blocks=a.num_cached_blocks + b.num_cached_blocks,
        num_held_pages=a.num_held_pages + b.num_held_pages,
        num_evictions=a.num_evictions + b.num_evictions,
        num_registered_prefixes=a.num_registered_prefixes,
    )


class ShardedBlocks:
    """Totals over the data shards' block managers, read-only: what capacity, stats and
    metrics report for an engine with a data axis (allocation goes through each shard's own
    manager, `DataShardedKV.blocks_of`)."""

    def __init__(self, managers: Sequence[BlockManager]):
        self.managers = list(managers)
        self.page_size = managers[0].page_size
        self.num_pages = sum(m.num_pages for m in managers)
        self.num_usable_pages = sum(m.num_usable_pages for m in managers)

    def num_free_pages(self) -> int:
        return sum(m.num_free_pages() for m in self.managers)

    def num_held_pages(self) -> int:
        return sum(m.num_held_pages() for m in self.managers)

    def num_used_pages(self) -> int:
        return sum(m.num_used_pages() for m in self.managers)

    def usage(self) -> float:
        return self.num_used_pages() / self.num_usable_pages

    def has_seq(self, seq_id: str) -> bool:
        return any(m.has_seq(seq_id) for m in self.managers)

    def block_table(self, seq_id: str) -> list[int]:
        """The sequence's pages, numbered within its shard's range."""
        return next(m for m in self.managers if m.has_seq(seq_id)).block_table(seq_id)

    def num_seqs(self) -> int:
        return sum(m.num_seqs() for m in self.managers)

    def check_invariants(self) -> None:
        for m in self.managers:
            m.check_invariants()
