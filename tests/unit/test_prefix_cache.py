"""Prefix cache: trust-zone isolation, scope resolution, hash chains, LRU eviction and audit; then
a hypothesis state machine over block manager + prefix cache + sessions.

`run` below plays the engine's part (resolve, match, attach, grow, insert), so each case reads
like a request going through the engine.
"""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pijax.audit import AuditLog
from pijax.block_manager import BlockManager, NoFreePagesError
from pijax.prefix_cache import PrefixCache, scope_key
from pijax.request import InvalidRequestError, Scope, ScopeKind
from pijax.sessions import SessionStore

P = 4  # page size of the unit cases
POLICY = list(range(100, 108))  # two full blocks
CLAIM = list(range(900_001, 900_013))  # three full blocks; distinctive ids, to grep the audit
SHARED = Scope.parse("shared:policy")
TENANT = Scope.parse("tenant")
PRIVATE = Scope.parse("private")
ALL_ZONES = frozenset({"policy"})


def session(name: str) -> Scope:
    return Scope(ScopeKind.SESSION, name)


def make(num_pages: int = 32):
    blocks = BlockManager(num_pages, P)
    log = AuditLog()
    return blocks, PrefixCache(blocks, log), log


def run(
    blocks, cache, seq, segments, *, tenant, session_id=None, zones=ALL_ZONES, extra=(), free=True
) -> int:
    """One request through the engine's path; returns the number of blocks reused."""
    infos = cache.resolve_blocks(
        segments, tenant=tenant, session_id=session_id, permitted_zones=zones, extra_tokens=extra
    )
    pages = cache.match(infos, request_id=seq, tenant=tenant)
    if pages:
        blocks.attach(seq, pages)
    blocks.ensure_capacity(seq, sum(len(t) for t, _ in segments) + len(extra))
    for info, page in zip(infos, blocks.block_table(seq), strict=False):
        if info is None:
            break
        cache.insert(info, page)
    if free:
        blocks.free(seq)
    blocks.check_invariants()
    cache.check_invariants()
    return len(pages)


# ---- isolation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", [TENANT, PRIVATE, session("s1")], ids=str)
def test_another_tenant_with_the_same_claim_reuses_nothing(scope):
    blocks, cache, log = make()
    segments = [(CLAIM, scope)]
    assert run(blocks, cache, "a1", segments, tenant="A", session_id="s1") == 0
    # Tenant B sends exactly A's claim, even under the same session id: no reuse.
    assert run(blocks, cache, "b1", segments, tenant="B", session_id="s1") == 0
    # A itself reuses its tenant/session blocks, never its private ones.
    expected = 0 if scope is PRIVATE else 3
    assert run(blocks, cache, "a2", segments, tenant="A", session_id="s1") == expected
    if scope.kind is ScopeKind.SESSION:  # another session of the same tenant: nothing
        assert run(blocks, cache, "a3", [(CLAIM, session("s2"))], tenant="A", session_id="s2") == 0
    assert len(log.read(kind="reuse", tenant="B")) == 0


def test_registered_shared_prefix_is_reused_across_permitted_tenants_only():
    blocks, cache, log = make()
    cache.register_trusted_prefix("policy", POLICY)
    segments = [(POLICY, SHARED), (CLAIM, PRIVATE)]
    assert run(blocks, cache, "a1", segments, tenant="A") == 0
    assert run(blocks, cache, "b1", segments, tenant="B") == 2  # both policy blocks, no claim
    assert run(blocks, cache, "c1", segments, tenant="C", zones=frozenset({"other"})) == 0
    infos = cache.resolve_blocks(segments, tenant="C", session_id=None, permitted_zones=frozenset())
    assert infos == [None] * 5  # not permitted: the segment is private, and so is the rest
    (record,) = log.read(kind="reuse")
    assert (record["tenant"], record["zone"], record["num_blocks"]) == ("B", "policy", 2)
    assert record["num_tokens"] == 2 * P and len(record["block_hashes"]) == 2


def test_unregistered_or_altered_shared_segment_is_private():
    blocks, cache, _ = make()
    segments = [(POLICY, SHARED), (CLAIM, TENANT)]
    assert (
        cache.resolve_blocks(segments, tenant="A", session_id=None, permitted_zones=ALL_ZONES)
        == [None] * 5
    )
    for seq, tenant in [("a1", "A"), ("b1", "B"), ("a2", "A")]:
        assert run(blocks, cache, seq, segments, tenant=tenant) == 0
    cache.register_trusted_prefix("policy", POLICY)
    for tokens in (POLICY[:4], POLICY + [7], POLICY[::-1]):  # not exactly the registered prefix
        assert not cache.is_registered("policy", tokens)
        infos = cache.resolve_blocks(
            [(tokens, SHARED)], tenant="A", session_id=None, permitted_zones=ALL_ZONES
        )
        assert all(info is None for info in infos)
    # Registered in another zone does not count for this one.
    cache.register_trusted_prefix("coding", CLAIM)
    assert (
        cache.resolve_blocks(
            [(CLAIM, SHARED)], tenant="A", session_id=None, permitted_zones={"policy", "coding"}
        )
        == [None] * 3
    )


def test_shared_segment_after_non_shared_content_is_private():
    _, cache, _ = make()
    cache.register_trusted_prefix("policy", POLICY)
    infos = cache.resolve_blocks(
        [(CLAIM[:4], TENANT), (POLICY, SHARED)],
        tenant="A",
        session_id=None,
        permitted_zones=ALL_ZONES,
    )
    assert infos[0].scope == TENANT and infos[1:] == [None, None]


def test_two_registered_zones_chain():
    _, cache, _ = make()
    cache.register_trusted_prefix("policy", POLICY)
    cache.register_trusted_prefix("coding", CLAIM[:8])
    segments = [(POLICY, SHARED), (CLAIM[:8], Scope.parse("shared:coding")), (CLAIM, TENANT)]
    infos = cache.resolve_blocks(
        segments, tenant="A", session_id=None, permitted_zones={"policy", "coding"}
    )
    assert [str(i.scope) for i in infos] == ["shared:policy"] * 2 + ["shared:coding"] * 2 + [
        "tenant"
    ] * 3
    only_policy = cache.resolve_blocks(
        segments, tenant="A", session_id=None, permitted_zones={"policy"}
    )
    assert only_policy[:2] == infos[:2] and only_policy[2:] == [None] * 5


# ---- scope resolution --------------------------------------------------------------------------


def test_straddling_block_takes_the_stricter_scope():
    _, cache, _ = make()
    policy6 = POLICY[:6]
    cache.register_trusted_prefix("policy", policy6)
    resolve = lambda segs, sid=None: cache.resolve_blocks(  # noqa: E731
        segs, tenant="A", session_id=sid, permitted_zones=ALL_ZONES
    )
    infos = resolve([(policy6, SHARED), (CLAIM[:6], TENANT)])
    assert [str(i.scope) for i in infos] == ["shared:policy", "tenant", "tenant"]
    infos = resolve([(CLAIM[:6], TENANT), (CLAIM[6:12], session("s"))], "s")
    assert [str(i.scope) for i in infos] == ["tenant", "session:s", "session:s"]
    infos = resolve([(policy6, SHARED), (CLAIM[:6], PRIVATE)])
    assert str(infos[0].scope) == "shared:policy" and infos[1:] == [None, None]
    # A looser segment after a stricter one is cached under the stricter scope.
    infos = resolve([(CLAIM[:4], session("s")), (CLAIM[4:8], TENANT)], "s")
    assert [str(i.scope) for i in infos] == ["session:s", "session:s"]


def test_once_private_always_private():
    _, cache, _ = make()
    infos = cache.resolve_blocks(
        [(CLAIM[:4], TENANT), (CLAIM[4:8], PRIVATE), (CLAIM[8:], TENANT)],
        tenant="A",
        session_id=None,
        permitted_zones=ALL_ZONES,
        extra_tokens=list(range(8)),
    )
    assert infos[0].scope == TENANT and infos[1:] == [None] * 4
    # With a session, an explicitly private segment stays private (no upgrade).
    infos = cache.resolve_blocks(
        [(CLAIM[:4], session("s")), (CLAIM[4:8], PRIVATE)],
        tenant="A",
        session_id="s",
        permitted_zones=ALL_ZONES,
    )
    assert infos[0].scope == session("s") and infos[1] is None


def test_generated_tokens_inherit_the_last_prompt_tokens_scope():
    _, cache, _ = make()
    # The last full prompt block is tenant, but the last prompt token is session-scoped.
    infos = cache.resolve_blocks(
        [(CLAIM[:4], TENANT), (CLAIM[4:6], session("s"))],
        tenant="A",
        session_id="s",
        permitted_zones=ALL_ZONES,
        extra_tokens=[1] * 10,
    )
    assert [str(i.scope) for i in infos] == ["tenant"] + ["session:s"] * 3
    # Output after an all-shared prompt is never cached under the zone.
    cache.register_trusted_prefix("policy", POLICY)
    infos = cache.resolve_blocks(
        [(POLICY, SHARED)],
        tenant="A",
        session_id=None,
        permitted_zones=ALL_ZONES,
        extra_tokens=[1] * 4,
    )
    assert [str(i.scope) for i in infos[:2]] == ["shared:policy"] * 2 and infos[2] is None


def test_session_scope_must_name_the_requests_session():
    _, cache, _ = make()
    for session_id in (None, "other"):
        with pytest.raises(InvalidRequestError, match="scope"):
            cache.resolve_blocks(
                [(CLAIM, session("s"))],
                tenant="A",
                session_id=session_id,
                permitted_zones=ALL_ZONES,
            )


def test_only_full_blocks_in_resolve_and_output_extends_the_chain():
    _, cache, _ = make()
    segments = [(CLAIM[:7], TENANT)]
    first = cache.resolve_blocks(segments, tenant="A", session_id=None, permitted_zones=())
    assert len(first) == 1 and first[0].num_tokens == P
    full = cache.resolve_blocks(
        segments, tenant="A", session_id=None, permitted_zones=(), extra_tokens=[5] * 6
    )
    assert len(full) == 3 and full[:1] == first  # output only appends blocks to the chain
    assert full[1].parent_hash == full[0].hash and full[2].parent_hash == full[1].hash


# ---- hash chain --------------------------------------------------------------------------------


def test_chain_a_different_first_block_changes_every_later_hash():
    _, cache, _ = make()
    resolve = lambda tokens, tenant="A": cache.resolve_blocks(  # noqa: E731
        [(tokens, TENANT)], tenant=tenant, session_id=None, permitted_zones=()
    )
    base = resolve(CLAIM)
    changed_first = resolve([0] + CLAIM[1:])
    assert all(a.hash != b.hash for a, b in zip(base, changed_first, strict=True))
    changed_last = resolve(CLAIM[:-1] + [0])
    assert [a.hash for a in base[:2]] == [b.hash for b in changed_last[:2]]
    assert base[2].hash != changed_last[2].hash
    assert all(a.hash != b.hash for a, b in zip(base, resolve(CLAIM, "B"), strict=True))
    assert base[1].parent_hash == base[0].hash and base[0].parent_hash is None


def test_scope_keys_are_unambiguous():
    keys = {
        scope_key(session("bc"), "a"),
        scope_key(session("c"), "ab"),
        scope_key(TENANT, "a"),
        scope_key(TENANT, "ab"),
        scope_key(SHARED, "x"),
        scope_key(Scope.parse("shared:a"), "whoever"),
        scope_key(Scope.parse("shared:ab"), ""),
    }
    assert len(keys) == 7
    assert scope_key(SHARED, "A") == scope_key(SHARED, "B")  # any permitted tenant may match
    with pytest.raises(ValueError, match="private"):
        scope_key(PRIVATE, "A")


# ---- insertion, matching, eviction -------------------------------------------------------------


def test_insert_is_idempotent_and_keeps_the_first_page_of_a_duplicate():
    blocks, cache, _ = make()
    (info,) = cache.resolve_blocks(
        [(CLAIM[:4], TENANT)], tenant="A", session_id=None, permitted_zones=()
    )
    first = blocks.ensure_capacity("x", 4)[0]
    second = blocks.ensure_capacity("y", 4)[0]
    cache.insert(info, first)
    cache.insert(info, first)
    cache.insert(info, second)  # computed twice concurrently: keep the existing mapping
    assert cache.page_of(info.hash) == first and cache.cached_pages() == {first}
    blocks.free("y")
    assert not blocks.is_held(second)  # uncached: straight back to the free list
    blocks.free("x")
    assert blocks.is_held(first)
    with pytest.raises(ValueError, match="referenced"):
        cache.insert(info, second)
    cache.check_invariants()


def test_match_stops_at_the_first_miss():
    blocks, cache, _ = make()
    run(blocks, cache, "a", [(CLAIM, TENANT)], tenant="A")
    infos = cache.resolve_blocks([(CLAIM, TENANT)], tenant="A", session_id=None, permitted_zones=())
    blocks.on_reclaim(1)  # evicts the tail block (a leaf)
    assert len(cache.match(infos, request_id="r", tenant="A")) == 2
    # Evict block 1 only: block 2 was never re-cached, block 0 stays: a gap stops the match.
    blocks.on_reclaim(1)
    assert len(cache.match(infos, request_id="r", tenant="A")) == 1
    assert cache.match([None, *infos], request_id="r", tenant="A") == []


def test_lru_evicts_tail_first_and_never_a_referenced_page():
    blocks, cache, _ = make(num_pages=9)  # 8 usable pages
    chain_a, chain_b = [(CLAIM, TENANT)], [(POLICY + [1] * 4, TENANT)]
    run(blocks, cache, "a", chain_a, tenant="A")  # released first: older
    run(blocks, cache, "b", chain_b, tenant="A")
    infos_a = cache.resolve_blocks(chain_a, tenant="A", session_id=None, permitted_zones=())
    infos_b = cache.resolve_blocks(chain_b, tenant="A", session_id=None, permitted_zones=())
    assert blocks.num_held_pages() == 6 and blocks.num_free_pages() == 2
    # A new request reuses chain a (reviving it) and needs 4 more pages: 2 must be evicted.
    assert run(blocks, cache, "c", chain_a, tenant="A", extra=[2] * 16, free=False) == 3
    cached = lambda infos: [cache.page_of(i.hash) is not None for i in infos]  # noqa: E731
    assert cached(infos_a) == [True] * 3  # referenced: untouchable though older
    assert cached(infos_b) == [True, False, False]  # b's tail went first
    with pytest.raises(NoFreePagesError):
        blocks.ensure_capacity("d", 2 * P)  # one held page left; referenced ones don't count
    blocks.free("c")
    held = blocks.num_held_pages()
    assert cache.clear() == held
    assert blocks.num_free_pages() == blocks.num_usable_pages


def test_a_parent_is_evicted_after_its_child_even_when_released_first():
    blocks, cache, _ = make()
    run(blocks, cache, "a", [(CLAIM, TENANT)], tenant="A", free=False)
    table = blocks.block_table("a")
    for page in table:
        blocks.incref(page)
    blocks.free("a")
    for page in table:  # head first: the head is the oldest released page
        blocks.decref(page)
    blocks.on_reclaim(1)
    assert cache.cached_pages() == set(table[:2])
    blocks.on_reclaim(1)
    assert cache.cached_pages() == {table[0]}
    cache.check_invariants()


def test_when_only_parents_of_referenced_blocks_are_held_the_oldest_parent_goes():
    blocks, cache, _ = make()
    run(blocks, cache, "a", [(CLAIM[:8], TENANT)], tenant="A", free=False)
    head, child = blocks.block_table("a")
    blocks.incref(child)  # e.g. pinned by someone else
    blocks.free("a")
    assert blocks.is_held(head) and not blocks.is_held(child)
    blocks.on_reclaim(1)
    assert cache.cached_pages() == {child}
    cache.check_invariants()
    blocks.decref(child)
    assert cache.clear() == 1 and blocks.num_free_pages() == blocks.num_usable_pages


def test_clear_returns_the_pool_to_all_free():
    blocks, cache, _ = make()
    cache.register_trusted_prefix("policy", POLICY)
    for i, tenant in enumerate("ABAB"):
        run(blocks, cache, f"r{i}", [(POLICY, SHARED), (CLAIM, TENANT)], tenant=tenant)
    held = blocks.num_held_pages()
    assert held == 2 + 3 + 3  # policy once, each tenant's claim once
    run(blocks, cache, "live", [(POLICY, SHARED)], tenant="A", free=False)
    assert cache.clear() == held - 2  # the live seq's policy pages stay
    blocks.free("live")
    assert cache.clear() == 2
    assert blocks.num_free_pages() == blocks.num_usable_pages
    assert cache.stats().num_cached_blocks == 0
    cache.check_invariants()


def test_one_cache_per_block_manager():
    blocks, _, _ = make()
    with pytest.raises(ValueError, match="hooks"):
        PrefixCache(blocks)


# ---- stats and audit ---------------------------------------------------------------------------


def test_stats_count_queries_hits_and_tokens_saved():
    blocks, cache, _ = make()
    cache.register_trusted_prefix("policy", POLICY)
    segments = [(POLICY, SHARED), (CLAIM, TENANT)]
    run(blocks, cache, "a1", segments, tenant="A")
    run(blocks, cache, "a2", segments, tenant="A")
    run(blocks, cache, "b1", segments, tenant="B")
    stats = cache.stats()
    assert stats.queries_by_zone == {"policy": 6, "tenant": 9}
    assert stats.hits_by_zone == {"policy": 4, "tenant": 3}
    assert stats.tokens_saved == 7 * P
    assert stats.hit_rate("policy") == pytest.approx(4 / 6)
    assert stats.num_registered_prefixes == 1
    assert stats.num_cached_blocks == 2 + 3 + 3 == stats.num_held_pages


def test_audit_records_match_the_reuses_that_happened():
    blocks, cache, log = make(num_pages=24)
    cache.register_trusted_prefix("policy", POLICY, source="config")
    requests = [
        ("A", [(POLICY, SHARED), (CLAIM, PRIVATE)], ALL_ZONES),
        ("B", [(POLICY, SHARED), (CLAIM, PRIVATE)], ALL_ZONES),
        ("C", [(POLICY, SHARED), (CLAIM, PRIVATE)], frozenset()),
        ("A", [(CLAIM, TENANT)], ALL_ZONES),
        ("B", [(CLAIM, TENANT)], ALL_ZONES),
        ("A", [(CLAIM, TENANT)], ALL_ZONES),
        ("A", [(POLICY, SHARED), (CLAIM, TENANT)], ALL_ZONES),
        ("A", [(POLICY, SHARED), (CLAIM, TENANT)], ALL_ZONES),
    ]
    reused: list[tuple[str, str, int]] = []
    for i, (tenant, segments, zones) in enumerate(requests):
        n = run(blocks, cache, f"r{i}", segments, tenant=tenant, zones=zones)
        if n:
            reused.append((f"r{i}", tenant, n))
    assert [n for _, _, n in reused] == [2, 3, 2, 5]
    records = log.read(kind="reuse")
    assert [(r["request_id"], r["tenant"], r["num_blocks"]) for r in records] == reused
    last = records[-1]
    assert last["scopes"] == ["shared:policy", "tenant"] and last["zone"] == "tenant"
    assert last["blocks_by_zone"] == {"policy": 2, "tenant": 3}
    assert [r["request_id"] for r in log.read(kind="reuse", zone="policy")] == ["r1", "r6", "r7"]
    (register,) = log.read(kind="register")
    assert (register["zone"], register["num_tokens"], register["source"]) == ("policy", 8, "config")
    assert len(register["block_hashes"]) == 2
    dump = json.dumps(log.read())
    assert not any(str(token) in dump for token in CLAIM)  # claim tokens never enter the log


def test_register_validates_zone_and_tokens():
    _, cache, _ = make()
    with pytest.raises(InvalidRequestError, match="scope"):
        cache.register_trusted_prefix("bad zone", POLICY)
    with pytest.raises(InvalidRequestError, match="zone"):
        cache.register_trusted_prefix("tenant", POLICY)
    with pytest.raises(InvalidRequestError, match="tokens"):
        cache.register_trusted_prefix("policy", [])


# ---- state machine -----------------------------------------------------------------------------

TENANTS = ("A", "B")
SESSION_IDS = ("s1", "own", "own")
PREFIXES = {"policy": [(1, 2, 3, 1, 2, 3, 1), (1, 2, 3, 1)], "coding": [(3, 3, 3, 3, 3)]}
SCOPES = (TENANT, TENANT, "session", "session", PRIVATE)
ZONE_SETS = st.sampled_from([frozenset(PREFIXES), frozenset({"policy"}), frozenset()])


# Claims are drawn mostly from a few canned token runs, so that requests collide often.
CLAIMS = [(0, 1, 2, 0, 1, 2, 0, 1), (0, 1, 2, 0, 1, 2, 2, 2), (2, 2, 2, 2), (1,)]
body_segments = st.lists(
    st.tuples(
        st.sampled_from(CLAIMS) | st.lists(st.integers(0, 2), max_size=6), st.sampled_from(SCOPES)
    ),
    max_size=3,
)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CacheMachine(RuleBasedStateMachine):
    """Random requests (attach matched pages, grow, insert full blocks), frees, session turns,
    registrations, reclaims and clears.

    Independently of the caches' own checks, a fake device records who computed each page
    (tokens up to the block's end, tenant, session, scope) and every reused page is checked
    against the request that reuses it: same tokens, and a tenant- or session-scoped page only
    ever reused by its own tenant or session; audit records are counted against the reuses.
    """

    @initialize(
        num_pages=st.integers(6, 48),
        page_size=st.sampled_from([1, 2, 4, 4]),
        max_session_pages=st.integers(0, 8),
        register_policy=st.booleans(),
    )
    def setup(self, num_pages, page_size, max_session_pages, register_policy):
        self.page_size = page_size
        self.blocks = BlockManager(num_pages, page_size)
        self.log = AuditLog()
        self.cache = PrefixCache(self.blocks, self.log)
        self.clock = FakeClock()
        self.sessions = SessionStore(
            self.blocks, ttl_s=10.0, max_pages=max_session_pages, audit=self.log, clock=self.clock
        )
        self.seqs: dict[str, dict] = {}
        self.turns: dict[str, dict] = {}  # session id -> its last finished turn
        self.device: dict[int, tuple] = {}
        self.ids = itertools.count()
        self.num_reuses = 0
        self.num_blocks_reused = 0
        self.submitted: list[tuple] = []
        if register_policy:
            self.cache.register_trusted_prefix("policy", PREFIXES["policy"][0])

    # -- the engine's path

    def _admit(self, tenant, session_id, segments, zones, output):
        if session_id is not None and self.sessions.owner_of(session_id) not in (None, tenant):
            event("another tenant's session refused")
            return None
        seq = f"r{next(self.ids)}"
        prompt = [t for tokens, _ in segments for t in tokens]
        if not prompt:
            return None
        prompt_infos = self.cache.resolve_blocks(
            segments, tenant=tenant, session_id=session_id, permitted_zones=zones
        )
        pages = self.cache.match(prompt_infos, request_id=seq, tenant=tenant)
        tokens = prompt + output
        if any(
            i is not None and i.scope.kind is ScopeKind.SHARED for i in prompt_infos[: len(pages)]
        ):
            event("shared prefix reused")
        for i, page in enumerate(pages):
            self._check_reuse(
                page, prompt_infos[i], tokens[: (i + 1) * self.page_size], tenant, session_id, zones
            )
        if pages:
            self.num_reuses += 1
            self.num_blocks_reused += len(pages)
            event("prefix reused")
            self.blocks.attach(seq, pages)
        evictions = self.cache.stats().num_evictions
        try:
            self.blocks.ensure_capacity(seq, len(tokens))
        except NoFreePagesError:
            event("no pages: request dropped")
            if self.blocks.has_seq(seq):
                self.blocks.free(seq)
            return None
        if self.cache.stats().num_evictions > evictions:
            event("allocation evicted held pages")
        table = self.blocks.block_table(seq)
        infos = self.cache.resolve_blocks(
            segments,
            tenant=tenant,
            session_id=session_id,
            permitted_zones=zones,
            extra_tokens=output,
        )
        for i in range(len(pages), len(table)):  # the device computes the rest
            end = (i + 1) * self.page_size
            info = infos[i] if i < len(infos) else None
            self.device[table[i]] = (
                tuple(tokens[:end]),
                tenant,
                session_id,
                None if info is None else str(info.scope),
            )
        for info, page in zip(infos, table, strict=False):
            if info is None:
                break
            self.cache.insert(info, page)
        self.seqs[seq] = dict(
            tenant=tenant,
            session_id=session_id,
            segments=segments,
            zones=zones,
            output=output,
            infos=infos,
        )
        return seq

    def _check_reuse(self, page, info, tokens, tenant, session_id, zones):
        written_tokens, writer, writer_session, scope = self.device[page]
        assert written_tokens == tuple(tokens), "reused a page holding other tokens"
        assert scope == str(info.scope), "reused a page computed under another scope"
        if info.scope.kind is ScopeKind.SHARED:
            assert info.scope.name in zones
        else:
            assert writer == tenant, "a tenant reused another tenant's page"
        if info.scope.kind is ScopeKind.SESSION:
            assert writer_session == session_id, "a session reused another session's page"

    # -- rules

    @rule(zone=st.sampled_from(sorted(PREFIXES)), index=st.integers(0, 1))
    def register(self, zone, index):
        candidates = PREFIXES[zone]
        self.cache.register_trusted_prefix(zone, candidates[index % len(candidates)])

    @rule(
        tenant=st.sampled_from(TENANTS),
        session_id=st.sampled_from((None,) + SESSION_IDS),
        shared=st.none() | st.tuples(st.sampled_from(sorted(PREFIXES)), st.integers(0, 1)),
        body=body_segments,
        zones=ZONE_SETS,
        output=st.lists(st.integers(0, 2), max_size=6),
        finish_now=st.booleans(),
        retain=st.booleans(),
    )
    def add_request(self, tenant, session_id, shared, body, zones, output, finish_now, retain):
        if session_id == "own":  # a session id no other tenant uses
            session_id = f"{tenant}-own"
        segments = []
        if shared is not None:
            zone, index = shared
            tokens = PREFIXES[zone][index % len(PREFIXES[zone])]
            segments.append((list(tokens), Scope(ScopeKind.SHARED, zone)))
        for tokens, scope in body:
            if scope == "session":
                scope = session(session_id) if session_id else TENANT
            segments.append((list(tokens), scope))
        seq = self._admit(tenant, session_id, segments, zones, output)
        self.submitted.append((tenant, session_id, segments, zones, output))
        if seq is not None and finish_now:
            self._finish(seq, retain)

    @rule(data=st.data(), other_tenant=st.booleans(), finish_now=st.booleans())
    def resubmit(self, data, other_tenant, finish_now):
        """The same request again: from its tenant (reuse), or from the other one (isolation)."""
        if not self.submitted:
            return
        tenant, session_id, segments, zones, output = data.draw(st.sampled_from(self.submitted))
        if other_tenant:
            tenant = next(t for t in TENANTS if t != tenant)
        seq = self._admit(tenant, session_id, segments, zones, output)
        if seq is not None and finish_now:
            self._finish(seq, retain=False)

    @rule(
        data=st.data(),
        new=st.lists(st.integers(0, 2), min_size=1, max_size=6),
        output=st.lists(st.integers(0, 2), max_size=6),
        finish_now=st.booleans(),
    )
    def next_turn(self, data, new, output, finish_now):
        if not self.turns:
            return
        session_id = data.draw(st.sampled_from(sorted(self.turns)))
        turn = self.turns[session_id]
        tenant = turn["tenant"]
        pinned = self.sessions.pages_of(tenant, session_id)
        if not self.sessions.touch(tenant, session_id, request_id=f"turn-{session_id}"):
            event("session gone before its next turn")
        segments = turn["segments"] + [(new, session(session_id))]
        matched_before = self.num_blocks_reused
        seq = self._admit(tenant, session_id, segments, turn["zones"], output)
        cached = self.cache.cached_pages()
        if pinned and not set(pinned) <= cached:
            event("pinned session pages not cached (a duplicate was cached first)")
        if seq is not None and pinned and set(pinned) <= cached:
            event("session turn resumed from pinned pages")
            assert self.num_blocks_reused - matched_before >= len(pinned)
            assert self.blocks.block_table(seq)[: len(pinned)] == pinned
        if seq is not None and finish_now:
            self._finish(seq, retain=True)

    @rule(data=st.data(), retain=st.booleans())
    def finish(self, data, retain):
        if self.seqs:
            self._finish(data.draw(st.sampled_from(sorted(self.seqs))), retain)

    def _finish(self, seq, retain):
        req = self.seqs.pop(seq)
        session_id, tenant = req["session_id"], req["tenant"]
        if retain and session_id is not None:
            cacheable = list(itertools.takewhile(lambda i: i is not None, req["infos"]))
            pages = self.blocks.block_table(seq)[: len(cacheable)]
            if self.sessions.owner_of(session_id) not in (None, tenant):
                with pytest.raises(InvalidRequestError, match="session_id"):
                    self.sessions.retain(tenant, session_id, pages, len(pages) * self.page_size)
            else:
                event("session retained")
                self.sessions.retain(tenant, session_id, pages, len(pages) * self.page_size)
                # The next turn repeats this turn's segments, the output in the scope it
                # inherited (a shared tail's output is private), then new session text.
                tail = next(
                    (scope for tokens, scope in reversed(req["segments"]) if tokens), PRIVATE
                )
                out_scope = PRIVATE if tail.kind is ScopeKind.SHARED else tail
                self.turns[session_id] = dict(
                    tenant=tenant,
                    zones=req["zones"],
                    segments=req["segments"] + [(req["output"], out_scope)],
                )
        self.blocks.free(seq)

    @rule(data=st.data(), wrong_tenant=st.booleans())
    def end_session(self, data, wrong_tenant):
        if not self.turns:
            return
        session_id = data.draw(st.sampled_from(sorted(self.turns)))
        owner = self.sessions.owner_of(session_id)
        if owner is None:
            assert not self.sessions.end("A", session_id)
            return
        if wrong_tenant:
            other = next(t for t in TENANTS if t != owner)
            assert not self.sessions.end(other, session_id)
            assert self.sessions.owner_of(session_id) == owner
        else:
            assert self.sessions.end(owner, session_id)
            assert self.sessions.owner_of(session_id) is None

    @rule(seconds=st.sampled_from([1.0, 6.0, 11.0]))
    def time_passes(self, seconds):
        self.clock.now += seconds
        if self.sessions.evict_expired():
            event("session expired")

    @rule(data=st.data())
    def reclaim(self, data):
        held = self.blocks.num_held_pages()
        if not held:
            return
        n = data.draw(st.integers(1, held))
        referenced = {p for p in self.cache.cached_pages() if self.blocks.refcount(p)}
        free_before = self.blocks.num_free_pages()
        self.blocks.on_reclaim(n)
        assert self.blocks.num_free_pages() == free_before + n
        assert referenced <= self.cache.cached_pages(), "a referenced page was evicted"

    @rule()
    def clear(self):
        held = self.blocks.num_held_pages()
        assert self.cache.clear() == held
        assert self.blocks.num_held_pages() == 0

    # -- invariants

    @invariant()
    def consistent(self):
        self.blocks.check_invariants()
        self.cache.check_invariants()
        self.sessions.check_invariants()
        held = {p for p in range(1, self.blocks.num_pages) if self.blocks.is_held(p)}
        assert held <= self.cache.cached_pages()
        assert all(self.blocks.refcount(p) >= 1 for p in self.sessions.pinned_pages())
        assert self.sessions.num_pages_held() <= self.sessions.max_pages
        reuse = self.log.read(kind="reuse")
        assert len(reuse) == self.num_reuses
        assert sum(r["num_blocks"] for r in reuse) == self.num_blocks_reused

    def teardown(self):
        if not hasattr(self, "blocks"):
            return
        for seq in list(self.seqs):
            self.blocks.free(seq)
        self.sessions.end_all()
        self.cache.clear()
        self.blocks.check_invariants()
        self.cache.check_invariants()
        assert self.blocks.num_free_pages() == self.blocks.num_usable_pages
        assert self.cache.stats().num_cached_blocks == 0


CacheMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_cache_state_machine = CacheMachine.TestCase
