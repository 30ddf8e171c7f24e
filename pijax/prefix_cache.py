"""Trust-zone prefix cache: hash chains with scope keys over full KV pages, LRU of held pages.

A request's prompt is a list of segments, each with a declared scope (DESIGN.md, trust zones).
`resolve_blocks` turns it into one `BlockInfo` per full page-size block, or None for a block that
must never be shared. Each block's hash chains over its parent's hash, its scope key and its
token ids, so a hit on block i implies the whole prefix up to i matches, tokens *and* scopes.

Scope rules (strictness: shared < tenant < session < private):

- `shared:<zone>` is shared only if the tenant is permitted the zone, the segment's tokens are
  exactly a prefix registered as trusted for that zone, and everything before it is shared too.
  Otherwise the segment is private.
- `tenant` is keyed by the tenant id; `session:<id>` by tenant id + session id, and <id> must be
  the request's session id.
- Private (declared, or a shared claim that failed the checks) makes that block and every later
  block None: never hashed, never inserted, never matched. This is the "fresh salt per request"
  of the design without having to draw one.
- Scopes only tighten along a prompt: a segment declared looser than what precedes it inherits
  the stricter scope (a `tenant` segment after a `session:s` segment is cached under
  `session:s`; it could only ever match within that session anyway, since the parent hash
  carries the session key). Hence a block straddling a boundary takes the scope of its last
  token, the stricter one, and generated tokens inherit the scope of the last prompt token
  (private if that is shared: nothing but a registered prefix is ever cached under a zone, so
  one tenant's sampled continuation of a shared scaffold is never visible to another).
- The scope key comes from the authenticated tenant the engine passes in; nothing a client
  sends is hashed as a salt.

Page lifecycle. `insert` maps a block hash to the page a live seq computed it in. When the page's
refcount drops to zero the block manager's `on_release` hook asks this cache, which keeps cached
pages *held* (refcount 0, evictable) in an LRU ordered by release time; uncached pages go back
to the free list. `attach` on a hit revives a held page. When the free list runs short the
block manager calls `on_reclaim(n)`, which evicts held pages least recently released first and,
among those, only *leaves*: a page whose block has a cached child is evicted after the child.
(The one exception: when the only held pages left are parents of referenced children, the pool's
need wins and the oldest parent goes; its referenced child stays cached, unreachable until the
parent is recomputed.) Referenced pages are never evicted.

Invariants (checked by `check_invariants`):

- `hash -> page` and `page -> block` are inverse maps; page 0 is never cached.
- Every cached page is referenced (refcount > 0) or held; every held page of the block manager
  is a cached page (this cache owns the release hooks) and sits in the LRU.
- The LRU holds cached pages only; it may also list cached pages revived since their release
  (dropped lazily when an eviction scan reaches them).
- `_num_children[h]` is the number of cached blocks whose parent hash is `h`.

What it knows nothing about: requests' lifecycles, sessions' pins (they are plain references
through `BlockManager.incref`), or devices.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
from collections.abc import Collection, Sequence

import numpy as np

from pijax.audit import AuditLog
from pijax.block_manager import NULL_PAGE, BlockManager
from pijax.request import InvalidRequestError, Scope, ScopeKind

_LEVEL = {ScopeKind.SHARED: 0, ScopeKind.TENANT: 1, ScopeKind.SESSION: 2, ScopeKind.PRIVATE: 3}
_PRIVATE_LEVEL = _LEVEL[ScopeKind.PRIVATE]
# Parent "hash" of every chain's first block. Versioned so a format change never aliases.
_ROOT = hashlib.sha256(b"pijax.prefix_cache.v1").digest()
# Stats use these pseudo-zones for tenant and session blocks, so no real zone may take them.
_RESERVED_ZONES = frozenset({"tenant", "session", "private"})


@dataclasses.dataclass(frozen=True)
class BlockInfo:
    """One full, cacheable block of a request.

    `hash` is the chained H(parent_hash, scope_key, block token ids); `scope` is the block's
    resolved scope (SHARED/TENANT/SESSION; private blocks are None in lists); `num_tokens` is
    the page size (only full blocks are cacheable); `parent_hash` is the previous block's hash
    (None for a chain's first block). The cache uses `parent_hash` to evict a chain tail first.
    """

    hash: bytes
    scope: Scope
    num_tokens: int
    parent_hash: bytes | None = None


@dataclasses.dataclass
class PrefixCacheStats:
    """Counters since construction. A *query* is a cacheable (non-None) block offered to
    `match`, a *hit* one that was reused; both by zone (the zone name for shared blocks,
    "tenant" / "session" for the others)."""

    queries_by_zone: dict[str, int]
    hits_by_zone: dict[str, int]
    tokens_saved: int
    num_cached_blocks: int
    num_held_pages: int
    num_evictions: int = 0
    num_registered_prefixes: int = 0

    def hit_rate(self, zone: str) -> float:
        queries = self.queries_by_zone.get(zone, 0)
        return self.hits_by_zone.get(zone, 0) / queries if queries else 0.0


def _field(text: str) -> bytes:
    """Length-prefixed UTF-8, so concatenated fields can never be re-split differently."""
    return _length_prefixed(text.encode("utf-8"))


def scope_key(scope: Scope, tenant: str) -> bytes:
    """The bytes a block's hash binds its scope to (DESIGN.md, trust zones).

    `shared:<zone>` -> the zone only (any permitted tenant may match); `tenant` -> the tenant
    id; `session:<id>` -> tenant id + session id. `tenant` is the authenticated tenant, never a
    client-supplied salt. Private scopes have no key: private blocks are never cached.
    """
    kind = scope.kind
    if kind is ScopeKind.PRIVATE:
        raise ValueError("scope 'private' has no scope key: private blocks are never cached")
    if kind in (ScopeKind.SHARED, ScopeKind.SESSION) and not scope.name:
        raise ValueError(f"scope {kind.value!r} needs a name; got {str(scope)!r}")
    if kind is ScopeKind.SHARED:
        return _field("shared") + _field(scope.name)
    if not tenant:
        raise ValueError(f"tenant must be a non-empty id for scope {str(scope)!r}; got {tenant!r}")
    if kind is ScopeKind.TENANT:
        return _field("tenant") + _field(tenant)
    return _field("session") + _field(tenant) + _field(scope.name)


def _zone(scope: Scope) -> str:
    return scope.name if scope.kind is ScopeKind.SHARED else scope.kind.value


def _token_array(tokens: Sequence[int], what: str) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.size == 0:
        return np.zeros(0, dtype="<i8")
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be a flat sequence of integer token ids")
    return arr.astype("<i8", copy=False)


def _length_prefixed(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


class PrefixCache:
    """Block hash -> page for full KV pages, scoped by trust zone; see the module docstring."""

    def __init__(self, blocks: BlockManager, audit: AuditLog | None = None):
        if blocks.on_release is not None or blocks.on_reclaim is not None:
            raise ValueError("blocks already has release hooks; one PrefixCache owns them")
        self.blocks = blocks
        self.page_size = blocks.page_size
        self.audit = audit
        self._page_of: dict[bytes, int] = {}
        self._block_of: dict[int, BlockInfo] = {}
        self._num_children: collections.Counter[bytes] = collections.Counter()
        # Held pages by release time, oldest first (plus revived ones not yet dropped).
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()
        # zone -> digests of the token sequences registered as trusted prefixes of the zone.
        self._registered: dict[str, set[bytes]] = {}
        self._queries: collections.Counter[str] = collections.Counter()
        self._hits: collections.Counter[str] = collections.Counter()
        self._tokens_saved = 0
        self._num_evictions = 0
        blocks.on_release = self._on_release
        blocks.on_reclaim = self._on_reclaim

    # ---- trusted prefixes ---------------------------------------------------------------------

    def register_trusted_prefix(
        self, zone: str, tokens: Sequence[int], *, source: str = "api"
    ) -> None:
        """Declare `tokens` a trusted prefix of `zone`: a `shared:<zone>` segment with exactly
        these tokens may be cached and reused by every tenant permitted the zone.

        Only the prefix's full blocks are ever shared (a trailing partial block straddles into
        whatever follows and takes its scope). Idempotent; every call is audited ("register").
        """
        Scope.parse(f"shared:{zone}")  # validates the name; raises InvalidRequestError
        if zone in _RESERVED_ZONES:
            raise InvalidRequestError(
                f"zone must not be one of {sorted(_RESERVED_ZONES)}; got {zone!r}"
            )
        arr = _token_array(tokens, "tokens")
        if arr.size == 0:
            raise InvalidRequestError("tokens must be a non-empty trusted prefix; got []")
        digests = self._registered.setdefault(zone, set())
        digest = self._prefix_digest(zone, arr)
        new = digest not in digests
        digests.add(digest)
        if self.audit is not None:
            infos = self.resolve_blocks(
                [(arr, Scope(ScopeKind.SHARED, zone))],
                tenant="",
                session_id=None,
                permitted_zones=frozenset({zone}),
            )
            self.audit.append(
                "register",
                zone=zone,
                num_tokens=int(arr.size),
                num_blocks=len(infos),
                block_hashes=[i.hash for i in infos],
                source=source,
                new=new,
            )

    def share_registry(self, other: PrefixCache) -> None:
        """Use `other`'s trusted-prefix registry (the data shards of one engine: a prefix is
        registered, and audited, once, and every shard resolves blocks alike)."""
        self._registered = other._registered

    def num_cached_blocks_of(self, infos: Sequence[BlockInfo | None]) -> int:
        """How many leading blocks of `infos` are cached here. Changes nothing (no counters, no
        LRU): for placing a request where its prefix is, before `match` takes it."""
        n = 0
        for info in infos:
            if info is None or info.hash not in self._page_of:
                break
            n += 1
        return n

    def is_registered(self, zone: str, tokens: Sequence[int]) -> bool:
        digests = self._registered.get(zone)
        if not digests:
            return False
        return self._prefix_digest(zone, _token_array(tokens, "tokens")) in digests

    @staticmethod
    def _prefix_digest(zone: str, arr: np.ndarray) -> bytes:
        return hashlib.sha256(_field(zone) + arr.tobytes()).digest()

    # ---- resolving a request's blocks ---------------------------------------------------------

    def resolve_blocks(
        self,
        segments: Sequence[tuple[Sequence[int], Scope]],
        *,
        tenant: str,
        session_id: str | None,
        permitted_zones: Collection[str],
        extra_tokens: Sequence[int] = (),
    ) -> list[BlockInfo | None]:
        """One entry per full block of (segment tokens..., extra_tokens); None = private.

        `extra_tokens` (generated output so far) inherit the scope of the last prompt token, or
        are private if that is shared.
        Once an entry is None every later one is too. Raises InvalidRequestError naming "scope"
        when a `session:<id>` segment names another session than `session_id`.
        """
        parts, ends, scopes = self._scope_runs(
            segments, session_id=session_id, permitted_zones=permitted_zones
        )
        num_prompt = ends[-1] if ends else 0
        extra = _token_array(extra_tokens, "extra_tokens")
        if extra.size:
            # Generated tokens inherit the last prompt token's scope, except that only
            # registered prefixes are ever shared: after an all-shared prompt they are private.
            tail = scopes[-1] if scopes else None
            if tail is not None and tail.kind is ScopeKind.SHARED:
                tail = None
            parts.append(extra)
            ends.append(num_prompt + int(extra.size))
            scopes.append(tail)
        num_tokens = ends[-1] if ends else 0
        num_blocks = num_tokens // self.page_size

        infos: list[BlockInfo | None] = []
        token_bytes = b""
        run_keys: list[bytes | None] = [None] * len(scopes)  # length-prefixed, per run
        stride = self.page_size * 8  # bytes per block of little-endian int64 token ids
        for i in range(num_blocks):
            run = bisect.bisect_right(ends, (i + 1) * self.page_size - 1)
            scope = scopes[run]  # the scope of the block's last token: the strictest in it
            if scope is None:
                infos.extend([None] * (num_blocks - i))
                break
            if not token_bytes:
                token_bytes = np.concatenate(parts).astype("<i8", copy=False).tobytes()
            key = run_keys[run]
            if key is None:
                key = run_keys[run] = _length_prefixed(scope_key(scope, tenant))
            parent = infos[i - 1].hash if i else None
            block = token_bytes[i * stride : (i + 1) * stride]
            block_hash = hashlib.sha256(b"".join((parent or _ROOT, key, block))).digest()
            infos.append(BlockInfo(block_hash, scope, self.page_size, parent))
        return infos

    def _scope_runs(self, segments, *, session_id, permitted_zones):
        """Token arrays, exclusive end offsets and effective scopes (None = private) of the
        non-empty segments; effective scopes never loosen along the prompt."""
        parts: list[np.ndarray] = []
        ends: list[int] = []
        scopes: list[Scope | None] = []
        level, current, pos = -1, None, 0
        for tokens, scope in segments:
            if scope.kind is ScopeKind.SESSION and scope.name != session_id:
                raise InvalidRequestError(
                    f"scope {str(scope)!r} must name the request's own session "
                    f"(session_id={session_id!r})"
                )
            arr = _token_array(tokens, "segment tokens")
            if arr.size == 0:
                continue
            effective: Scope | None = scope
            if scope.kind is ScopeKind.PRIVATE:
                effective = None
            elif scope.kind is ScopeKind.SHARED and not (
                level <= _LEVEL[ScopeKind.SHARED]
                and scope.name in permitted_zones
                and self.is_registered(scope.name, arr)
            ):
                effective = None
            new_level = _PRIVATE_LEVEL if effective is None else _LEVEL[effective.kind]
            if new_level >= level:
                level, current = new_level, effective
            pos += int(arr.size)
            parts.append(arr)
            ends.append(pos)
            scopes.append(current)
        return parts, ends, scopes

    # ---- lookup and insertion -----------------------------------------------------------------

    def match(
        self, infos: Sequence[BlockInfo | None], *, request_id: str, tenant: str
    ) -> list[int]:
        """Pages of the longest cached prefix of `infos` (stops at the first None or miss).

        Does not take references: the engine must `blocks.attach(seq_id, pages)` next, before
        anything allocates (an allocation may evict a held page returned here). Counts queries
        and hits by zone and tokens saved, and appends one "reuse" audit record when at least
        one block is reused.
        """
        hits: list[BlockInfo] = []
        missed = False
        for info in infos:
            if info is None:
                break
            self._queries[_zone(info.scope)] += 1  # blocks after a miss still count as queries
            if not missed and info.hash in self._page_of:
                hits.append(info)
            else:
                missed = True
        if not hits:
            return []
        by_zone = collections.Counter(_zone(info.scope) for info in hits)
        self._hits.update(by_zone)
        num_tokens = len(hits) * self.page_size
        self._tokens_saved += num_tokens
        pages = [self._page_of[info.hash] for info in hits]
        if self.audit is not None:
            strictest = hits[-1].scope  # scopes only tighten along a chain
            self.audit.append(
                "reuse",
                request_id=request_id,
                tenant=tenant,
                scope=str(strictest),
                scopes=list(dict.fromkeys(str(info.scope) for info in hits)),
                zone=_zone(strictest),
                zones=list(by_zone),
                blocks_by_zone=dict(by_zone),
                num_blocks=len(hits),
                num_tokens=num_tokens,
                block_hashes=[info.hash for info in hits],
            )
        return pages

    def insert(self, info: BlockInfo, page: int) -> None:
        """Cache a computed full block living in `page`, which a live seq references.

        Idempotent. If the hash is already cached under another page, the existing mapping is
        kept (the caller's page is then released normally when its seq ends).
        """
        if info.num_tokens != self.page_size:
            raise ValueError(
                f"only full blocks of {self.page_size} tokens are cacheable; got {info.num_tokens}"
            )
        if info.scope.kind is ScopeKind.PRIVATE:
            raise ValueError("private blocks are never cached")
        if page == NULL_PAGE or self.blocks.refcount(page) == 0:
            raise ValueError(f"page {page} must be referenced by a live seq to be cached")
        cached = self._block_of.get(page)
        if cached is not None:
            if cached.hash == info.hash:
                return
            raise ValueError(f"page {page} already caches another block")
        if info.hash in self._page_of:
            return
        self._page_of[info.hash] = page
        self._block_of[page] = info
        if info.parent_hash is not None:
            self._num_children[info.parent_hash] += 1

    # ---- eviction -----------------------------------------------------------------------------

    def _on_release(self, page: int) -> bool:
        """Block-manager hook: keep a cached page held (evictable, most recent in the LRU)."""
        if page not in self._block_of:
            return False
        self._lru[page] = None
        self._lru.move_to_end(page)
        return True

    def _on_reclaim(self, num_pages: int) -> None:
        self._evict(num_pages)

    def _evict(self, num_pages: int) -> int:
        """Evict up to `num_pages` held pages, LRU leaves first; return how many."""
        evicted = 0
        while evicted < num_pages:
            victims = self._lru_leaves(num_pages - evicted)
            if not victims:
                # Every held page is a parent of a referenced block: the pool's need wins.
                # (`_lru_leaves` just dropped revived pages, so the LRU's head is held.)
                oldest = next(iter(self._lru), None)
                if oldest is None:
                    break
                victims = [oldest]
            for page in victims:
                self._drop(page)
            evicted += len(victims)
        return evicted

    def _lru_leaves(self, limit: int) -> list[int]:
        """Up to `limit` held pages, oldest first, whose blocks have no cached child once the
        earlier picks are gone. Drops revived pages from the LRU on the way."""
        victims: list[int] = []
        revived: list[int] = []
        picked_children: collections.Counter[bytes] = collections.Counter()
        for page in self._lru:
            if not self.blocks.is_held(page):
                revived.append(page)
                continue
            info = self._block_of[page]
            if self._num_children[info.hash] - picked_children[info.hash] == 0:
                victims.append(page)
                if info.parent_hash is not None:
                    picked_children[info.parent_hash] += 1
                if len(victims) == limit:
                    break
        for page in revived:
            del self._lru[page]
        return victims

    def _drop(self, page: int) -> None:
        info = self._block_of.pop(page)
        del self._page_of[info.hash]
        if info.parent_hash is not None:
            self._num_children[info.parent_hash] -= 1
            if not self._num_children[info.parent_hash]:
                del self._num_children[info.parent_hash]
        del self._lru[page]
        self.blocks.release_to_free_list(page)
        self._num_evictions += 1

    def clear(self) -> int:
        """Evict every held page; return how many. Referenced cached pages stay cached."""
        return self._evict(self.blocks.num_held_pages())

    # ---- introspection ------------------------------------------------------------------------

    def page_of(self, block_hash: bytes) -> int | None:
        return self._page_of.get(block_hash)

    def cached_pages(self) -> frozenset[int]:
        return frozenset(self._block_of)

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            queries_by_zone=dict(self._queries),
            hits_by_zone=dict(self._hits),
            tokens_saved=self._tokens_saved,
            num_cached_blocks=len(self._page_of),
            num_held_pages=self.blocks.num_held_pages(),
            num_evictions=self._num_evictions,
            num_registered_prefixes=sum(len(d) for d in self._registered.values()),
        )

    def check_invariants(self) -> None:
        """Assert the invariants of the module docstring; O(pages + cached blocks)."""
        blocks = self.blocks
        assert blocks.on_release == self._on_release, "on_release hook replaced"
        assert blocks.on_reclaim == self._on_reclaim, "on_reclaim hook replaced"
        assert len(self._page_of) == len(self._block_of), "hash and page maps differ in size"
        for block_hash, page in self._page_of.items():
            assert page != NULL_PAGE and 0 < page < blocks.num_pages, f"cached bad page {page}"
            info = self._block_of.get(page)
            assert info is not None and info.hash == block_hash, (
                f"hash {block_hash.hex()[:12]} maps to page {page}, which maps back elsewhere"
            )
            assert blocks.refcount(page) > 0 or blocks.is_held(page), f"cached page {page} is free"
            assert info.scope.kind is not ScopeKind.PRIVATE, f"page {page} caches a private block"
        for page in range(1, blocks.num_pages):
            if blocks.is_held(page):
                assert page in self._block_of, f"held page {page} is not cached"
                assert page in self._lru, f"held page {page} is missing from the LRU"
        for page in self._lru:
            assert page in self._block_of, f"LRU lists uncached page {page}"
        children = collections.Counter(
            info.parent_hash for info in self._block_of.values() if info.parent_hash is not None
        )
        assert dict(children) == dict(self._num_children), "child counts are stale"
