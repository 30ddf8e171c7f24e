"""Session store: pins across turns, idle TTL (fake clock), LRU page cap, explicit end, owners;
and a session resumed through the prefix cache."""

from __future__ import annotations

import pytest

from pijax.audit import AuditLog
from pijax.block_manager import BlockManager
from pijax.prefix_cache import PrefixCache
from pijax.request import InvalidRequestError, Scope, ScopeKind
from pijax.sessions import SessionStore

P = 4


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(num_pages=32, max_pages=8, ttl_s=10.0):
    blocks = BlockManager(num_pages, P)
    log = AuditLog()
    clock = FakeClock()
    store = SessionStore(blocks, ttl_s=ttl_s, max_pages=max_pages, audit=log, clock=clock)
    return blocks, store, log, clock


def finished_turn(blocks, seq, num_tokens):
    """A seq that has just finished a turn of `num_tokens` tokens: its block table."""
    blocks.ensure_capacity(seq, num_tokens)
    return blocks.block_table(seq)


def retain_and_free(blocks, store, tenant, session_id, seq, num_tokens):
    pages = finished_turn(blocks, seq, num_tokens)
    store.retain(tenant, session_id, pages, num_tokens)
    blocks.free(seq)
    store.check_invariants()
    blocks.check_invariants()
    return pages


def test_retain_pins_full_pages_only():
    blocks, store, _, _ = make()
    pages = retain_and_free(blocks, store, "A", "s", "t1", 2 * P + 1)
    assert store.pages_of("A", "s") == pages[:2]
    assert [blocks.refcount(p) for p in pages] == [1, 1, 0]  # the partial page went back
    assert store.num_pages_held() == 2 and store.owner_of("s") == "A"


def test_retain_replaces_the_previous_turns_pins():
    blocks, store, _, _ = make()
    first = finished_turn(blocks, "t1", 2 * P)
    store.retain("A", "s", first, 2 * P)
    blocks.free("t1")
    # The next turn reuses the first turn's pages and adds two (the engine attached them).
    blocks.attach("t2", first)
    second = first + blocks.ensure_capacity("t2", 4 * P)
    store.retain("A", "s", second, 4 * P)
    blocks.free("t2")
    assert store.pages_of("A", "s") == second
    assert [blocks.refcount(p) for p in second] == [1, 1, 1, 1]  # pinned once, not twice
    assert store.num_pages_held() == 4
    # A shorter turn (say the session's context was cut) unpins what it no longer covers.
    blocks.attach("t3", second[:1])
    store.retain("A", "s", second[:1], P)
    blocks.free("t3")
    assert [blocks.refcount(p) for p in second] == [1, 0, 0, 0]
    assert blocks.num_free_pages() == blocks.num_usable_pages - 1
    store.check_invariants()
    blocks.check_invariants()


def test_idle_ttl_with_a_fake_clock():
    blocks, store, log, clock = make(ttl_s=10.0)
    pages = retain_and_free(blocks, store, "A", "s", "t1", 2 * P)
    retain_and_free(blocks, store, "B", "other", "t2", P)
    clock.now += 5
    assert store.touch("A", "s")  # a new turn arrived: refresh
    clock.now += 9  # s idle 9 s, other idle 14 s
    assert store.evict_expired() == 1
    assert store.owner_of("other") is None and store.owner_of("s") == "A"
    clock.now += 2  # s idle 11 s
    assert store.evict_expired() == 1
    assert store.num_sessions() == 0 and store.num_pages_held() == 0
    assert all(blocks.refcount(p) == 0 for p in pages)
    assert blocks.num_free_pages() == blocks.num_usable_pages
    evictions = log.read(kind="session_evict")
    assert [(r["tenant"], r["session_id"], r["reason"], r["num_pages"]) for r in evictions] == [
        ("B", "other", "ttl", 1),
        ("A", "s", "ttl", 2),
    ]


def test_touch_after_the_ttl_evicts_instead_of_reviving():
    blocks, store, log, clock = make(ttl_s=10.0)
    retain_and_free(blocks, store, "A", "s", "t1", P)
    clock.now += 10.5
    assert not store.touch("A", "s")
    assert store.owner_of("s") is None and store.num_pages_held() == 0
    assert log.read(kind="session_evict")[0]["reason"] == "ttl"


def test_touch_audits_a_reuse_when_given_the_request():
    blocks, store, log, _ = make()
    retain_and_free(blocks, store, "A", "s", "t1", 2 * P)
    assert store.touch("A", "s", request_id="turn-2")
    assert not store.touch("B", "s", request_id="x") and not store.touch("A", "nope")
    (record,) = log.read(kind="session_reuse")
    assert (record["tenant"], record["session_id"], record["request_id"], record["num_pages"]) == (
        "A",
        "s",
        "turn-2",
        2,
    )


def test_lru_cap_evicts_the_least_recently_used_sessions():
    blocks, store, log, clock = make(max_pages=4)
    retain_and_free(blocks, store, "A", "s1", "t1", 2 * P)
    clock.now += 1
    retain_and_free(blocks, store, "A", "s2", "t2", 2 * P)
    clock.now += 1
    assert store.touch("A", "s1")  # s2 is now the least recently used
    clock.now += 1
    retain_and_free(blocks, store, "B", "s3", "t3", 2 * P)
    assert store.owner_of("s2") is None
    assert {store.owner_of("s1"), store.owner_of("s3")} == {"A", "B"}
    assert store.num_pages_held() == 4
    (record,) = log.read(kind="session_evict")
    assert (record["session_id"], record["reason"], record["num_pages"]) == ("s2", "lru_cap", 2)


def test_a_session_alone_over_the_cap_keeps_its_first_pages():
    blocks, store, log, _ = make(max_pages=3)
    retain_and_free(blocks, store, "A", "s1", "t1", P)
    pages = retain_and_free(blocks, store, "A", "big", "t2", 5 * P)
    assert store.pages_of("A", "big") == pages[:3]
    assert store.owner_of("s1") is None  # evicted to make room
    assert [blocks.refcount(p) for p in pages] == [1, 1, 1, 0, 0]
    reasons = [(r["session_id"], r["reason"]) for r in log.read(kind="session_evict")]
    assert reasons == [("big", "over_cap"), ("s1", "lru_cap")]


def test_cap_counts_distinct_pages():
    blocks, store, _, _ = make(max_pages=3)
    shared = finished_turn(blocks, "policy", 2 * P)
    store.retain("A", "s1", shared, 2 * P)
    store.retain("B", "s2", shared, 2 * P)  # both sessions start with the same policy pages
    blocks.free("policy")
    assert store.num_pages_held() == 2 and store.num_sessions() == 2
    assert [blocks.refcount(p) for p in shared] == [2, 2]
    store.check_invariants()


def test_end_unpins_and_audits_and_checks_the_owner():
    blocks, store, log, _ = make()
    pages = retain_and_free(blocks, store, "A", "s", "t1", 2 * P)
    assert not store.end("B", "s")  # another tenant's session: not found
    assert store.owner_of("s") == "A"
    assert not store.end("A", "unknown")
    assert store.end("A", "s")
    assert store.owner_of("s") is None and store.pages_of("A", "s") == []
    assert all(blocks.refcount(p) == 0 for p in pages)
    (record,) = log.read(kind="session_end")
    assert (record["tenant"], record["session_id"], record["num_pages"]) == ("A", "s", 2)
    assert not store.end("A", "s")


def test_another_tenant_cannot_retain_a_session_id():
    blocks, store, _, _ = make()
    retain_and_free(blocks, store, "A", "s", "t1", P)
    pages = finished_turn(blocks, "t2", P)
    with pytest.raises(InvalidRequestError, match="session_id"):
        store.retain("B", "s", pages, P)
    assert store.owner_of("s") == "A" and blocks.refcount(pages[0]) == 1
    assert store.pages_of("B", "s") == []


def test_retain_is_all_or_nothing():
    blocks, store, _, _ = make()
    pages = finished_turn(blocks, "t1", 2 * P)
    blocks.free("t1")  # the engine freed before retaining: the pages are free, not pinnable
    with pytest.raises(ValueError, match="free"):
        store.retain("A", "s", pages, 2 * P)
    assert store.num_sessions() == 0 and blocks.num_free_pages() == blocks.num_usable_pages
    with pytest.raises(ValueError, match="pages"):
        store.retain("A", "s", pages[:1], 2 * P)
    store.check_invariants()
    blocks.check_invariants()


def test_end_all():
    blocks, store, log, _ = make()
    retain_and_free(blocks, store, "A", "s1", "t1", P)
    retain_and_free(blocks, store, "B", "s2", "t2", P)
    assert store.end_all() == 2 and store.num_sessions() == 0
    assert blocks.num_free_pages() == blocks.num_usable_pages
    assert len(log.read(kind="session_end")) == 2


def test_constructor_validates():
    blocks = BlockManager(8, P)
    with pytest.raises(ValueError, match="ttl_s"):
        SessionStore(blocks, ttl_s=0, max_pages=1)
    with pytest.raises(ValueError, match="max_pages"):
        SessionStore(blocks, max_pages=-1)


def test_next_turn_resumes_from_the_prefix_cache_and_unpinned_pages_become_evictable():
    blocks = BlockManager(32, P)
    log = AuditLog()
    cache = PrefixCache(blocks, log)
    store = SessionStore(blocks, max_pages=8, audit=log)
    scope = Scope(ScopeKind.SESSION, "s")

    def turn(seq, tokens, output):
        segments = [(tokens, scope)]
        kw = dict(tenant="A", session_id="s", permitted_zones=frozenset())
        infos = cache.resolve_blocks(segments, **kw)
        pages = cache.match(infos, request_id=seq, tenant="A")
        if pages:
            blocks.attach(seq, pages)
        blocks.ensure_capacity(seq, len(tokens) + len(output))
        table = blocks.block_table(seq)
        infos = cache.resolve_blocks(segments, extra_tokens=output, **kw)
        for info, page in zip(infos, table, strict=False):
            cache.insert(info, page)
        store.retain("A", "s", table[: len(infos)], len(infos) * P)
        blocks.free(seq)
        cache.check_invariants()
        store.check_invariants()
        return len(pages)

    history = list(range(10))
    output = [50, 51, 52, 53, 54, 55]
    assert turn("t1", history, output) == 0
    assert blocks.num_held_pages() == 0  # the session pins every cached page
    history += output + [60, 61, 62]
    assert turn("t2", history, [70]) == 4  # all of turn 1's full blocks (16 tokens)
    assert log.read(kind="reuse")[0]["scope"] == "session:s"
    assert store.end("A", "s")
    assert blocks.num_held_pages() == 5  # unpinned: cached and evictable
    assert cache.clear() == 5
    assert blocks.num_free_pages() == blocks.num_usable_pages


def test_one_tenants_new_sessions_do_not_evict_a_lighter_tenants_session():
    """Issue 14: one shared LRU cap let tenant A's new sessions evict tenant B's pinned KV."""
    blocks, store, log, clock = make(num_pages=64, max_pages=8)
    b_pages = retain_and_free(blocks, store, "B", "b1", "tb", 2 * P)
    for i in range(6):  # A keeps opening sessions: far more than the cap together
        clock.now += 1
        retain_and_free(blocks, store, "A", f"a{i}", f"ta{i}", 2 * P)
    assert store.pages_of("B", "b1") == b_pages[:2]  # B is the lighter tenant: untouched
    assert store.num_pages_held() <= 8
    evicted = {r["session_id"] for r in log.read(kind="session_evict")}
    assert evicted and all(sid.startswith("a") for sid in evicted)


def test_per_tenant_cap_evicts_the_tenants_own_sessions():
    blocks = BlockManager(64, P)
    store = SessionStore(blocks, max_pages=12, max_pages_per_tenant=4, audit=AuditLog())
    retain_and_free(blocks, store, "B", "b1", "tb", 2 * P)
    for i in range(4):
        retain_and_free(blocks, store, "A", f"a{i}", f"ta{i}", 2 * P)
    assert store.num_pages_of_tenant("A") == 4 and store.num_pages_of_tenant("B") == 2
    assert store.owner_of("b1") == "B"
    assert store.owner_of("a3") == "A" and store.owner_of("a0") is None
