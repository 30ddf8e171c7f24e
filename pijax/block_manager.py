"""Host-side block manager: the free list, per-page reference counts and per-sequence block tables.

The KV pool on device is an array of `num_pages` pages of `page_size` token slots each
(`kv_pool.py`). This module decides which sequence owns which page; it never touches device
memory, and it never needs a page copied: pages are shared only when full.

Page 0 is the null page: padded block-table entries point at it and padded tokens write into it,
so it is never handed out, never owned and never on the free list.

Sharing. A page may have several owners: sequences (through their block tables) and external
holders (the prefix cache, sessions) that took a reference with `incref`. Sequences share only
*full* pages (`attach` takes nothing else), so a sequence only ever writes new tokens into a
page that no other sequence reads.

Release. When a page's refcount reaches zero it goes back to the free list, unless the optional
`on_release` hook claims it (the prefix cache keeps such pages as evictable, LRU). A claimed page
is *held*: refcount zero, not free, revived by `incref`/`attach` on a cache hit, and given back
with `release_to_free_list` when its owner evicts it. When the free list runs short the manager
asks the owner to evict through the optional `on_reclaim` hook.

What it knows nothing about: tokens, hashes, scopes, requests or priorities. Those live in the
prefix cache and the scheduler, which build on the page-level API here.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

NULL_PAGE = 0


class NoFreePagesError(RuntimeError):
    """Not enough free pages for the request; the manager's state is unchanged."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Free list, refcounts and block tables over pages `1 .. num_pages - 1`.

    Invariants (checked by `check_invariants`):

    - Page 0 (`NULL_PAGE`) is never allocated, never in a block table, never on the free list,
      and its refcount stays 0.
    - Block tables are append-only while the sequence lives: entries are never replaced or
      removed until `free`. The batch builder may cache a prefix of a table.
    - A sequence holds exactly `cdiv(num_tokens, page_size)` pages and owns each at most once.
    - `refcount(p)` == number of block tables containing `p` + external references to `p`
      (taken with `incref`, dropped with `decref`).
    - Every usable page is in exactly one state: *used* (refcount > 0), *free* (refcount 0, on
      the free list, once) or *held* (refcount 0, claimed by the `on_release` hook). Hence
      free + used + held == num_usable_pages.
    - Only full pages are shared between sequences: a sequence's trailing partial page belongs
      to no other block table, so appending tokens never writes into a page another sequence
      reads.

    Allocation and release are O(1) per page: the free list is a FIFO deque, so a freed page is
    reused as late as possible (stale-page bugs show up instead of hiding).
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the null page); got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1; got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_usable_pages = num_pages - 1
        self._free_pages: collections.deque[int] = collections.deque(range(1, num_pages))
        self._refcounts: list[int] = [0] * num_pages
        self._external_refs: list[int] = [0] * num_pages
        self._held_pages: set[int] = set()
        # Trailing partial pages of live seqs: written by exactly one seq, never shared.
        self._open_pages: set[int] = set()
        self._block_tables: dict[str, list[int]] = {}
        self._num_tokens: dict[str, int] = {}
        # Called with a page whose refcount just reached 0; returning True keeps the page held
        # (not free) until its owner calls `release_to_free_list`. Must not call back into the
        # manager.
        self.on_release: Callable[[int], bool] | None = None
        # Called with a number of pages when the free list is short of it; its owner evicts up
        # to that many held pages through `release_to_free_list`. When set, held pages count
        # as available in `can_allocate`.
        self.on_reclaim: Callable[[int], None] | None = None

    # ---- pool-level queries -------------------------------------------------------------------

    def num_free_pages(self) -> int:
        return len(self._free_pages)

    def num_held_pages(self) -> int:
        """Pages with refcount 0 kept by the `on_release` hook (evictable cache pages)."""
        return len(self._held_pages)

    def num_used_pages(self) -> int:
        return self.num_usable_pages - len(self._free_pages) - len(self._held_pages)

    def num_available_pages(self) -> int:
        """Free pages, plus held pages when an `on_reclaim` hook can evict them on demand."""
        reclaimable = len(self._held_pages) if self.on_reclaim is not None else 0
        return len(self._free_pages) + reclaimable

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= self.num_available_pages()

    def usage(self) -> float:
        """Fraction of usable pages with refcount > 0 (held cache pages count as not used)."""
        return self.num_used_pages() / self.num_usable_pages

    # ---- sequences ----------------------------------------------------------------------------

    def has_seq(self, seq_id: str) -> bool:
        return seq_id in self._block_tables

    def block_table(self, seq_id: str) -> list[int]:
        """The seq's pages in token order. A copy: append-only, so callers may cache prefixes."""
        return list(self._table(seq_id))

    def num_tokens(self, seq_id: str) -> int:
        """Tokens the seq's pages were sized for by `ensure_capacity` / `attach`."""
        self._table(seq_id)
        return self._num_tokens[seq_id]

    def num_seqs(self) -> int:
        return len(self._block_tables)

    def pages_needed(self, seq_id: str, num_tokens: int) -> int:
        """Extra pages `seq_id` (known or not) needs to hold `num_tokens` tokens in total."""
        held = len(self._block_tables.get(seq_id, ()))
        return max(0, _cdiv(num_tokens, self.page_size) - held)

    def ensure_capacity(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow `seq_id` (created if new) to hold `num_tokens` tokens; return the new pages.

        All-or-nothing: raises `NoFreePagesError` with nothing changed when the pages are not
        available. Asking for fewer tokens than the seq holds changes nothing (no shrinking).
        Growing into a trailing partial page requires that the seq alone holds it (refcount 1):
        the engine is about to write there.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0; got {num_tokens}")
        table = self._block_tables.get(seq_id)
        current = self._num_tokens.get(seq_id, 0)
        if table is not None and num_tokens > current and current % self.page_size:
            last = table[-1]
            if self._refcounts[last] != 1:
                raise RuntimeError(
                    f"seq {seq_id!r} would append into page {last}, which has refcount "
                    f"{self._refcounts[last]}; only a page the seq alone holds may be written"
                )
        new_pages = self._take_free_pages(self.pages_needed(seq_id, num_tokens))
        for page in new_pages:
            self._refcounts[page] = 1
        if table is None:
            table = self._block_tables[seq_id] = []
        if table:
            self._open_pages.discard(table[-1])
        table.extend(new_pages)
        num_tokens = self._num_tokens[seq_id] = max(current, num_tokens)
        if num_tokens % self.page_size:
            self._open_pages.add(table[-1])
        return new_pages

    def free(self, seq_id: str) -> None:
        """Drop the seq and decref its pages, tail first.

        Tail first so that an LRU owner of released pages (the prefix cache) evicts the end of a
        hash chain before its beginning.
        """
        table = self._table(seq_id)
        del self._block_tables[seq_id]
        del self._num_tokens[seq_id]
        if table:
            self._open_pages.discard(table[-1])
        for page in reversed(table):
            self._decref(page)

    # ---- page-level API (prefix cache, sessions) ----------------------------------------------

    def incref(self, page: int) -> None:
        """Take an external reference to a used page, or revive a held one (a cache hit)."""
        self._check_page(page)
        self._revive(page)
        self._refcounts[page] += 1
        self._external_refs[page] += 1

    def decref(self, page: int) -> bool:
        """Drop an external reference; True if the page reached refcount 0 and was released."""
        self._check_page(page)
        if self._external_refs[page] == 0:
            raise ValueError(f"page {page} has no external reference to drop")
        self._external_refs[page] -= 1
        return self._decref(page)

    def attach(self, seq_id: str, pages: Sequence[int]) -> None:
        """Start a new seq whose table begins with `pages`: full pages already used (e.g. a
        session's) or held (a prefix-cache hit: revived), each incref'd. The seq then holds
        `len(pages) * page_size` tokens and grows with `ensure_capacity`."""
        if seq_id in self._block_tables:
            raise ValueError(f"seq {seq_id!r} already exists")
        if len(set(pages)) != len(pages):
            raise ValueError(f"pages must be distinct; got {list(pages)}")
        for page in pages:
            self._check_page(page)
            if page in self._open_pages:
                raise ValueError(f"page {page} is a seq's partial page; only full pages are shared")
            if self._refcounts[page] > 0:
                continue
            if page not in self._held_pages:
                raise ValueError(f"page {page} is free; only used or held pages can be attached")
        for page in pages:
            self._revive(page)
            self._refcounts[page] += 1
        self._block_tables[seq_id] = list(pages)
        self._num_tokens[seq_id] = len(pages) * self.page_size

    def refcount(self, page: int) -> int:
        self._check_page(page, allow_null=True)
        return self._refcounts[page]

    def is_held(self, page: int) -> bool:
        return page in self._held_pages

    def release_to_free_list(self, page: int) -> None:
        """Give a held page back to the free list (its owner evicted it)."""
        if page not in self._held_pages:
            raise ValueError(f"page {page} is not held by the on_release hook")
        self._held_pages.remove(page)
        self._free_pages.append(page)

    # ---- invariants ---------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert every invariant of the class docstring; O(pages + table entries)."""
        num_pages = self.num_pages
        assert self._refcounts[NULL_PAGE] == 0, "null page has a refcount"
        assert self._external_refs[NULL_PAGE] == 0, "null page has an external reference"

        seq_owners = [0] * num_pages
        for seq_id, table in self._block_tables.items():
            num_tokens = self._num_tokens[seq_id]
            assert len(table) == _cdiv(num_tokens, self.page_size), (
                f"seq {seq_id!r} holds {len(table)} pages for {num_tokens} tokens "
                f"(page_size {self.page_size})"
            )
            assert len(set(table)) == len(table), f"seq {seq_id!r} owns a page twice: {table}"
            for page in table:
                assert 0 < page < num_pages, f"seq {seq_id!r} holds invalid page {page}"
                seq_owners[page] += 1

        partial_pages = set()
        for seq_id, table in self._block_tables.items():
            if self._num_tokens[seq_id] % self.page_size:
                last = table[-1]
                partial_pages.add(last)
                assert seq_owners[last] == 1, (
                    f"partial page {last} of seq {seq_id!r} is in {seq_owners[last]} block tables"
                )
        assert partial_pages == self._open_pages, (
            f"open-page index {sorted(self._open_pages)} != partial pages {sorted(partial_pages)}"
        )

        for page in range(num_pages):
            expected = seq_owners[page] + self._external_refs[page]
            assert self._external_refs[page] >= 0, f"page {page} has negative external refs"
            assert self._refcounts[page] == expected, (
                f"page {page}: refcount {self._refcounts[page]} != {seq_owners[page]} seq owners "
                f"+ {self._external_refs[page]} external refs"
            )

        free_set = set(self._free_pages)
        assert len(free_set) == len(self._free_pages), "free list holds a page twice"
        assert NULL_PAGE not in free_set, "null page is on the free list"
        assert NULL_PAGE not in self._held_pages, "null page is held"
        assert not (free_set & self._held_pages), "a page is both free and held"
        for page in free_set | self._held_pages:
            assert 0 < page < num_pages, f"invalid page {page} on the free list or held"
            assert self._refcounts[page] == 0, (
                f"page {page} is free or held with refcount {self._refcounts[page]}"
            )

        num_used = sum(1 for count in self._refcounts if count > 0)
        accounted = len(free_set) + len(self._held_pages) + num_used
        assert accounted == self.num_usable_pages, (
            f"free {len(free_set)} + held {len(self._held_pages)} + used {num_used} "
            f"!= usable {self.num_usable_pages} (a page leaked)"
        )

    # ---- internals ----------------------------------------------------------------------------

    def _table(self, seq_id: str) -> list[int]:
        table = self._block_tables.get(seq_id)
        if table is None:
            raise KeyError(f"unknown seq {seq_id!r}")
        return table

    def _check_page(self, page: int, allow_null: bool = False) -> None:
        lowest = NULL_PAGE if allow_null else NULL_PAGE + 1
        if not lowest <= page < self.num_pages:
            raise ValueError(f"page must be in [{lowest}, {self.num_pages}); got {page}")

    def _take_free_pages(self, count: int) -> list[int]:
        """Pop `count` free pages (refcounts untouched), evicting held pages first if needed."""
        if count == 0:
            return []
        shortfall = count - len(self._free_pages)
        if shortfall > 0 and self.on_reclaim is not None and shortfall <= len(self._held_pages):
            self.on_reclaim(shortfall)
        if count > len(self._free_pages):
            raise NoFreePagesError(
                f"need {count} pages; {len(self._free_pages)} free, "
                f"{len(self._held_pages)} held of {self.num_usable_pages} usable"
            )
        return [self._free_pages.popleft() for _ in range(count)]

    def _revive(self, page: int) -> None:
        if self._refcounts[page] == 0:
            if page not in self._held_pages:
                raise ValueError(f"page {page} is free; it cannot be referenced")
            self._held_pages.remove(page)

    def _decref(self, page: int) -> bool:
        count = self._refcounts[page] - 1
        assert count >= 0, f"page {page} decref'd below zero"
        self._refcounts[page] = count
        if count:
            return False
        if self.on_release is not None and self.on_release(page):
            self._held_pages.add(page)
        else:
            self._free_pages.append(page)
        return True
