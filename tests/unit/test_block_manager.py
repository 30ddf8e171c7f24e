"""Block manager: unit cases, then a hypothesis state machine against an independent model.

The state machine keeps its own block tables (built from what the manager returns), its own
external references and a fake prefix cache behind the release hooks, and simulates the device
pool slot by slot: every seq writes its own token values into the pages its table names and
must read back exactly its own history. A page wrongly shared between two writers shows up as a
corrupted history, independently of `check_invariants`.
"""

from __future__ import annotations

import collections
import itertools

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pijax.block_manager import NULL_PAGE, BlockManager, NoFreePagesError


def snapshot(bm: BlockManager, seq_ids: list[str]) -> tuple:
    """Everything observable through the public API, to assert that a failed call changed
    nothing."""
    return (
        bm.num_free_pages(),
        bm.num_held_pages(),
        [bm.refcount(page) for page in range(bm.num_pages)],
        {seq: (bm.block_table(seq), bm.num_tokens(seq)) for seq in seq_ids},
    )


# ---- unit cases --------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [8, 16, 32])
def test_allocation_across_page_boundaries(page_size):
    bm = BlockManager(num_pages=16, page_size=page_size)
    table: list[int] = []
    for num_tokens in [
        1,
        page_size - 1,
        page_size,
        page_size + 1,
        2 * page_size,
        3 * page_size + 1,
    ]:
        needed = bm.pages_needed("a", num_tokens)
        new_pages = bm.ensure_capacity("a", num_tokens)
        assert len(new_pages) == needed
        expected_pages = -(-num_tokens // page_size)
        assert len(table) + needed == expected_pages
        table += new_pages
        assert bm.block_table("a") == table  # append-only
        assert bm.num_tokens("a") == num_tokens
        assert bm.pages_needed("a", num_tokens) == 0
        bm.check_invariants()
    assert bm.num_free_pages() == bm.num_usable_pages - expected_pages
    assert all(bm.refcount(page) == 1 for page in bm.block_table("a"))


def test_ensure_capacity_returns_only_new_pages_and_never_shrinks():
    bm = BlockManager(num_pages=8, page_size=8)
    first = bm.ensure_capacity("a", 9)
    assert len(first) == 2
    assert bm.ensure_capacity("a", 16) == []
    assert bm.ensure_capacity("a", 3) == []
    assert bm.num_tokens("a") == 16
    third = bm.ensure_capacity("a", 17)
    assert len(third) == 1
    assert bm.block_table("a") == first + third


def test_null_page_never_allocated():
    bm = BlockManager(num_pages=9, page_size=4)
    pages = bm.ensure_capacity("a", 4 * 5) + bm.ensure_capacity("b", 4 * 3)
    assert sorted(pages) == list(range(1, 9))
    assert NULL_PAGE not in pages
    assert bm.num_free_pages() == 0
    with pytest.raises(NoFreePagesError):
        bm.ensure_capacity("c", 1)
    with pytest.raises(ValueError):
        bm.incref(NULL_PAGE)
    assert bm.refcount(NULL_PAGE) == 0
    bm.check_invariants()


def test_free_returns_pages():
    bm = BlockManager(num_pages=10, page_size=16)
    bm.ensure_capacity("a", 40)
    bm.ensure_capacity("b", 16)
    assert bm.num_free_pages() == 9 - 4
    assert bm.usage() == pytest.approx(4 / 9)
    bm.free("a")
    assert not bm.has_seq("a")
    assert bm.num_free_pages() == 9 - 1
    bm.free("b")
    assert bm.num_free_pages() == 9
    assert bm.usage() == 0.0
    assert all(bm.refcount(page) == 0 for page in range(10))
    bm.check_invariants()
    with pytest.raises(KeyError):
        bm.free("a")


def test_no_free_pages_leaves_state_unchanged():
    bm = BlockManager(num_pages=5, page_size=8)
    bm.ensure_capacity("a", 20)  # 3 pages, 1 free
    before = snapshot(bm, ["a"])
    assert not bm.can_allocate(2)
    with pytest.raises(NoFreePagesError):
        bm.ensure_capacity("a", 20 + 12 + 1)
    with pytest.raises(NoFreePagesError):
        bm.ensure_capacity("b", 17)
    assert isinstance(NoFreePagesError("x"), RuntimeError)
    assert snapshot(bm, ["a"]) == before
    assert not bm.has_seq("b")
    bm.ensure_capacity("c", 8)  # takes the last page
    before = snapshot(bm, ["a", "c"])
    with pytest.raises(NoFreePagesError):
        bm.ensure_capacity("a2", 1)
    assert snapshot(bm, ["a", "c"]) == before
    assert not bm.has_seq("a2")
    bm.check_invariants()


def test_attach_shares_full_pages_and_each_seq_appends_into_its_own():
    bm = BlockManager(num_pages=10, page_size=8)
    parent = bm.ensure_capacity("p", 24)
    free_before = bm.num_free_pages()
    bm.attach("c", parent)
    assert bm.block_table("c") == parent
    assert bm.num_tokens("c") == 24
    assert bm.num_free_pages() == free_before
    assert all(bm.refcount(page) == 2 for page in parent)
    # Appending to either side allocates a private page: the full pages stay read-only.
    assert bm.ensure_capacity("c", 25) != bm.ensure_capacity("p", 25)
    with pytest.raises(ValueError, match="already exists"):
        bm.attach("c", parent[:1])
    bm.check_invariants()
    bm.free("p")
    assert [bm.refcount(page) for page in parent] == [1, 1, 1]
    bm.free("c")
    assert bm.num_free_pages() == bm.num_usable_pages
    bm.check_invariants()


def test_attach_of_an_attach_counts_every_owner():
    bm = BlockManager(num_pages=12, page_size=4)
    pages = bm.ensure_capacity("a", 9)
    bm.attach("b", pages[:2])
    bm.attach("c", bm.block_table("b"))
    assert [bm.refcount(page) for page in pages[:2]] == [3, 3]
    assert bm.refcount(pages[2]) == 1
    for seq in ["b", "a"]:
        bm.free(seq)
    assert [bm.refcount(page) for page in pages[:2]] == [1, 1]
    bm.check_invariants()


def test_external_references():
    bm = BlockManager(num_pages=6, page_size=4)
    (page,) = bm.ensure_capacity("z", 4)
    bm.incref(page)
    bm.free("z")  # the external reference keeps the page
    assert bm.refcount(page) == 1
    bm.incref(page)
    assert bm.refcount(page) == 2
    assert bm.decref(page) is False
    assert bm.decref(page) is True
    assert bm.refcount(page) == 0
    with pytest.raises(ValueError):
        bm.decref(page)  # no external reference left
    with pytest.raises(ValueError):
        bm.incref(page)  # free pages cannot be referenced
    seq_page = bm.ensure_capacity("a", 4)[0]
    with pytest.raises(ValueError):
        bm.decref(seq_page)  # the seq's own reference is dropped by free(), not decref()
    bm.incref(seq_page)  # e.g. a session keeping the page past the seq
    bm.free("a")
    assert bm.refcount(seq_page) == 1
    assert bm.decref(seq_page)
    assert bm.num_free_pages() == bm.num_usable_pages
    bm.check_invariants()


def test_append_into_a_shared_partial_page_is_refused():
    bm = BlockManager(num_pages=6, page_size=4)
    (page,) = bm.ensure_capacity("a", 3)
    bm.incref(page)
    before = snapshot(bm, ["a"])
    with pytest.raises(RuntimeError, match="refcount 2"):
        bm.ensure_capacity("a", 4)
    assert snapshot(bm, ["a"]) == before
    bm.decref(page)
    bm.ensure_capacity("a", 4)


def test_attach_full_pages_only():
    bm = BlockManager(num_pages=10, page_size=4)
    pages = bm.ensure_capacity("a", 12)
    assert bm.attach("b", pages[:2]) is None
    assert bm.block_table("b") == pages[:2]
    assert bm.num_tokens("b") == 8
    assert [bm.refcount(page) for page in pages] == [2, 2, 1]
    bm.check_invariants()
    partial = bm.ensure_capacity("c", 10)[-1]
    with pytest.raises(ValueError, match="distinct"):
        bm.attach("d", [pages[0], pages[0]])
    with pytest.raises(ValueError, match="partial page"):
        bm.attach("d", [partial])  # c's partial page: never shared
    (free_page,) = bm.ensure_capacity("e", 1)
    bm.free("e")
    with pytest.raises(ValueError, match="free"):
        bm.attach("d", [free_page])
    with pytest.raises(ValueError, match="already exists"):
        bm.attach("a", pages[:1])
    assert not bm.has_seq("d")
    bm.check_invariants()


def test_release_hook_keeps_pages_and_reclaim_evicts_them():
    bm = BlockManager(num_pages=5, page_size=4)
    released: list[int] = []
    lru: collections.OrderedDict[int, None] = collections.OrderedDict()

    def keep(page: int) -> bool:
        released.append(page)
        lru[page] = None
        return True

    def reclaim(num_pages: int) -> None:
        for _ in range(num_pages):
            page, _ = lru.popitem(last=False)
            bm.release_to_free_list(page)

    bm.on_release = keep
    pages = bm.ensure_capacity("a", 12)
    bm.free("a")
    assert released == pages[::-1]  # tail first
    assert bm.num_free_pages() == 1 and bm.num_held_pages() == 3
    assert all(bm.is_held(page) for page in pages)
    assert not bm.can_allocate(2)  # no reclaim hook: held pages are not available
    bm.check_invariants()

    # A cache hit revives held pages.
    bm.attach("b", pages[::-1][:2])
    assert bm.num_held_pages() == 1
    del lru[pages[2]], lru[pages[1]]
    bm.check_invariants()
    bm.free("b")
    assert bm.num_held_pages() == 3

    bm.on_reclaim = reclaim
    assert bm.can_allocate(4)
    new_pages = bm.ensure_capacity("c", 13)  # 4 pages: 1 free + 3 evicted
    assert sorted(new_pages) == [1, 2, 3, 4]
    assert bm.num_held_pages() == 0
    bm.check_invariants()
    with pytest.raises(ValueError):
        bm.release_to_free_list(new_pages[0])  # not held


def test_check_invariants_catches_corruption():
    bm = BlockManager(num_pages=6, page_size=4)
    pages = bm.ensure_capacity("a", 8)
    bm.check_invariants()
    bm._free_pages.append(pages[0])
    with pytest.raises(AssertionError, match="free"):
        bm.check_invariants()
    bm._free_pages.pop()
    bm._refcounts[pages[1]] += 1
    with pytest.raises(AssertionError, match="refcount"):
        bm.check_invariants()
    bm._refcounts[pages[1]] -= 1
    bm._block_tables["a"].append(NULL_PAGE)
    with pytest.raises(AssertionError):
        bm.check_invariants()


def test_constructor_validates():
    with pytest.raises(ValueError, match="num_pages"):
        BlockManager(num_pages=1, page_size=4)
    with pytest.raises(ValueError, match="page_size"):
        BlockManager(num_pages=4, page_size=0)


# ---- state machine -----------------------------------------------------------------------------


class BlockManagerMachine(RuleBasedStateMachine):
    """Random ensure_capacity / append / attach / free / external refs / cache eviction."""

    @initialize(
        num_pages=st.integers(2, 24),
        page_size=st.sampled_from([1, 2, 4, 8]),
        cache_mode=st.sampled_from(["none", "keep", "keep_and_reclaim"]),
    )
    def setup(self, num_pages, page_size, cache_mode):
        self.bm = BlockManager(num_pages, page_size)
        self.page_size = page_size
        self.tables: dict[str, list[int]] = {}
        self.history: dict[str, list[object]] = {}
        self.external: collections.Counter[int] = collections.Counter()
        self.cache: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.device: dict[int, list[object]] = {
            page: [None] * page_size for page in range(num_pages)
        }
        self.ids = itertools.count()
        if cache_mode != "none":
            self.bm.on_release = self._keep_released
        if cache_mode == "keep_and_reclaim":
            self.bm.on_reclaim = self._reclaim

    # -- fake prefix cache behind the hooks

    def _keep_released(self, page: int) -> bool:
        assert page not in self.cache
        self.cache[page] = None
        return True

    def _reclaim(self, num_pages: int) -> None:
        event("allocation reclaims held pages")
        self._evict_lru(num_pages)

    def _evict_lru(self, num_pages: int) -> None:
        for _ in range(min(num_pages, len(self.cache))):
            page, _ = self.cache.popitem(last=False)
            self.bm.release_to_free_list(page)

    # -- model helpers

    def _used_pages(self) -> set[int]:
        return {p for table in self.tables.values() for p in table} | set(+self.external)

    def _open_pages(self) -> set[int]:
        return {
            table[-1]
            for seq, table in self.tables.items()
            if len(self.history[seq]) % self.page_size
        }

    def _write(self, seq: str, num_new: int) -> None:
        """Write num_new fresh token values for seq into the slots its table names."""
        start = len(self.history[seq])
        for pos in range(start, start + num_new):
            value = (seq, pos)
            page = self.tables[seq][pos // self.page_size]
            self.device[page][pos % self.page_size] = value
            self.history[seq].append(value)

    def _read(self, pages: list[int], num_tokens: int) -> list[object]:
        return [
            self.device[pages[i // self.page_size]][i % self.page_size] for i in range(num_tokens)
        ]

    def _assert_fresh(self, pages: list[int]) -> None:
        """A page handed out fresh must be owned by nobody: no seq, no external ref, no cache."""
        assert NULL_PAGE not in pages
        assert len(set(pages)) == len(pages)
        assert set(pages).isdisjoint(self._used_pages()), "page handed out while owned"
        assert set(pages).isdisjoint(self.cache), "held page handed out without eviction"

    def _expect_no_pages(self, call, seq_ids: list[str]) -> None:
        event("NoFreePagesError")
        before = snapshot(self.bm, seq_ids)
        with pytest.raises(NoFreePagesError):
            call()
        assert snapshot(self.bm, seq_ids) == before

    def _available(self) -> int:
        free = self.bm.num_usable_pages - len(self._used_pages()) - len(self.cache)
        return free + (len(self.cache) if self.bm.on_reclaim is not None else 0)

    # -- rules

    @rule(num_tokens=st.integers(0, 40))
    def start_seq(self, num_tokens):
        seq = f"s{next(self.ids)}"
        needed = -(-num_tokens // self.page_size)
        assert self.bm.pages_needed(seq, num_tokens) == needed
        if needed > self._available():
            assert not self.bm.can_allocate(needed)
            self._expect_no_pages(
                lambda: self.bm.ensure_capacity(seq, num_tokens), list(self.tables)
            )
            assert not self.bm.has_seq(seq)
            return
        new_pages = self.bm.ensure_capacity(seq, num_tokens)
        assert len(new_pages) == needed
        self._assert_fresh(new_pages)
        self.tables[seq] = list(new_pages)
        self.history[seq] = []
        self._write(seq, num_tokens)

    @precondition(lambda self: self.tables)
    @rule(data=st.data(), num_new=st.integers(0, 20))
    def append(self, data, num_new):
        seq = data.draw(st.sampled_from(sorted(self.tables)))
        current = len(self.history[seq])
        target = current + num_new
        needed = -(-target // self.page_size) - len(self.tables[seq])
        last = self.tables[seq][-1] if self.tables[seq] else None
        if num_new and current % self.page_size and self.external[last]:
            event("append into a shared partial page refused")
            before = snapshot(self.bm, list(self.tables))
            with pytest.raises(RuntimeError, match="refcount"):
                self.bm.ensure_capacity(seq, target)
            assert snapshot(self.bm, list(self.tables)) == before
            return
        if needed > self._available():
            self._expect_no_pages(lambda: self.bm.ensure_capacity(seq, target), list(self.tables))
            return
        new_pages = self.bm.ensure_capacity(seq, target)
        assert len(new_pages) == needed
        self._assert_fresh(new_pages)
        self.tables[seq].extend(new_pages)
        self._write(seq, num_new)

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tables)))
        self.bm.free(seq)
        del self.tables[seq], self.history[seq]
        assert not self.bm.has_seq(seq)

    @rule(data=st.data(), num_pages=st.integers(1, 3))
    def attach(self, data, num_pages):
        """A cache hit or a session resume: full pages, used or held."""
        candidates = sorted((self._used_pages() - self._open_pages()) | set(self.cache))
        if len(candidates) < num_pages:
            return
        pages = data.draw(st.permutations(candidates))[:num_pages]
        seq = f"s{next(self.ids)}"
        assert self.bm.attach(seq, pages) is None
        if set(pages) & set(self.cache):
            event("attach revives held pages")
        for page in pages:
            self.cache.pop(page, None)  # a hit takes the page out of the cache's LRU
        self.tables[seq] = list(pages)
        self.history[seq] = self._read(pages, num_pages * self.page_size)

    @precondition(lambda self: self._used_pages())
    @rule(data=st.data())
    def take_external_ref(self, data):
        page = data.draw(st.sampled_from(sorted(self._used_pages())))
        self.bm.incref(page)
        self.external[page] += 1

    @precondition(lambda self: +self.external)
    @rule(data=st.data())
    def drop_external_ref(self, data):
        page = data.draw(st.sampled_from(sorted(+self.external)))
        self.external[page] -= 1
        owned_by_seq = any(page in table for table in self.tables.values())
        released = self.bm.decref(page)
        assert released == (self.external[page] == 0 and not owned_by_seq)

    @precondition(lambda self: self.cache)
    @rule(num_pages=st.integers(1, 3))
    def evict(self, num_pages):
        self._evict_lru(num_pages)

    # -- invariants

    @invariant()
    def manager_invariants_hold(self):
        self.bm.check_invariants()

    @invariant()
    def tables_match_the_model(self):
        for seq, table in self.tables.items():
            assert self.bm.block_table(seq) == table
            assert self.bm.num_tokens(seq) == len(self.history[seq])

    @invariant()
    def refcounts_match_owners(self):
        owners = collections.Counter(p for table in self.tables.values() for p in table)
        for page in range(self.bm.num_pages):
            assert self.bm.refcount(page) == owners[page] + self.external[page], page
        assert self.bm.refcount(NULL_PAGE) == 0

    @invariant()
    def pages_shared_only_when_full(self):
        """A page in two tables is full in every table holding it (so no one writes into it)."""
        holders: collections.Counter[int] = collections.Counter()
        partial: set[int] = set()
        for seq, table in self.tables.items():
            holders.update(table)
            num_full = len(self.history[seq]) // self.page_size
            partial.update(table[num_full:])
        shared = {page for page, count in holders.items() if count > 1}
        assert not shared & partial, sorted(shared & partial)

    @invariant()
    def every_seq_reads_its_own_history(self):
        for seq, table in self.tables.items():
            assert self._read(table, len(self.history[seq])) == self.history[seq], seq

    @invariant()
    def free_plus_used_plus_held_is_total(self):
        used = len(self._used_pages())
        assert self.bm.num_held_pages() == len(self.cache)
        assert self.bm.num_free_pages() + used + len(self.cache) == self.bm.num_usable_pages
        assert self.bm.usage() == pytest.approx(used / self.bm.num_usable_pages)

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in list(self.tables):
            self.bm.free(seq)
        for page, count in self.external.items():
            for _ in range(count):
                self.bm.decref(page)
        self._evict_lru(len(self.cache))
        self.bm.check_invariants()
        assert self.bm.num_free_pages() == self.bm.num_usable_pages
        assert all(self.bm.refcount(page) == 0 for page in range(self.bm.num_pages))


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_block_manager_state_machine = BlockManagerMachine.TestCase
