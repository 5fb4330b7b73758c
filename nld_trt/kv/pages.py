"""The page manager: which page holds what, in plain Python (no tensors), owned by the batcher.

- Pages are reference-counted. A sequence's `PageTable` lists the pages of its positions 0, P, 2P, ...
  (it takes pages as it grows); a page of a finished sequence is either free or, when it is in the prefix
  index, cached: unreferenced, reusable by the next sequence whose tokens match, and evicted least recently
  used when a sequence needs a page and none is free.
- The prefix index maps a page's chain hash to the page. A page enters it when it fills with committed
  tokens; its hash is hash(parent page's hash, the page's token ids, the extra keys overlapping it), so equal
  hashes mean equal tokens at equal positions after equal prefixes: equal committed K/V, since committed K/V
  are always computed causally with the plain weights (the draft adapter never touches them). The hash is
  BLAKE2b (64 bits) of the bytes, stable across processes (not Python's salted hash()).
- A new sequence reuses the longest indexed prefix of full pages of its prompt (`lookup` + `adopt`);
  shared pages are read-only: a sequence only ever writes positions at or past its committed length, and an
  indexed page holds only committed positions.
- Changes to the index are reported through `on_event` (nld_trt/kv/events.py).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import NLDError
from .events import CacheCleared, EventCallback, ExtraKey, PagesRemoved, PagesStored, StoredPage

HASH_PERSON = b"nld-trt-kv-page"


def page_hash(parent: int | None, tokens: Sequence[int], extra: Sequence[ExtraKey] = ()) -> int:
    """The chain hash of one full page: its parent page's hash (None for a sequence's first page), its token
    ids and the extra keys overlapping it, as an unsigned 64-bit int."""
    h = hashlib.blake2b(digest_size=8, person=HASH_PERSON)
    h.update(b"\x00" if parent is None else b"\x01" + parent.to_bytes(8, "little"))
    h.update(struct.pack(f"<I{len(tokens)}q", len(tokens), *tokens))
    for key in extra:
        h.update(struct.pack("<qqI", key.start, key.end, len(key.digest)) + key.digest)
    return int.from_bytes(h.digest(), "little")


def extra_keys_of(extra: Sequence[ExtraKey], start: int, end: int) -> tuple[ExtraKey, ...]:
    """The extra keys that overlap positions start..end-1."""
    return tuple(k for k in extra if k.start < end and k.end > start)


@dataclass
class PageTable:
    """One sequence's pages and committed tokens. `tokens` are the committed token ids (the cache's committed
    length is len(tokens)); `hashes` the chain hashes of its full committed pages; `cached` how many
    positions at its start were reused from the prefix cache when it (last) started."""

    extra: tuple[ExtraKey, ...] = ()
    pages: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    cached: int = 0

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class KVStats:
    queries: int = 0  # prompt tokens looked up in the prefix index
    hits: int = 0  # of which found
    preemptions: int = 0  # sequences that gave their pages back to let older ones advance (the batcher counts)


class PageManager:
    """A pool of `pages` pages of `page_size` positions (see the module docstring)."""

    def __init__(self, pages: int, page_size: int, prefix_cache: bool = True,
                 on_event: EventCallback | None = None) -> None:
        if pages < 1 or page_size < 1:
            raise NLDError(f"a page pool needs pages >= 1 and page_size >= 1, got {pages}, {page_size}")
        self.total = pages
        self.page_size = page_size
        self.prefix_cache = prefix_cache
        self.on_event = on_event
        self.refs = [0] * pages
        self.free: list[int] = list(range(pages - 1, -1, -1))  # a stack: low pages first
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced pages, least recent first
        self.index: dict[int, int] = {}  # chain hash -> page
        self.page_hash: dict[int, int] = {}  # indexed page -> its hash
        self.stats = KVStats()

    # counts ---------------------------------------------------------------------------------------
    @property
    def available(self) -> int:
        """Pages a sequence can take now: free ones and cached unreferenced ones (evicted on demand)."""
        return len(self.free) + len(self.lru)

    @property
    def in_use(self) -> int:
        """Pages referenced by sequences."""
        return self.total - self.available

    @property
    def cached(self) -> int:
        """Pages in the prefix index (referenced or not)."""
        return len(self.index)

    def pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    def shortfall(self, table: PageTable, positions: int) -> int:
        """New pages `table` needs to cover `positions` positions."""
        return max(0, self.pages_for(positions) - len(table.pages))

    # the prefix index ---------------------------------------------------------------------------------
    def chain(self, tokens: Sequence[int], extra: Sequence[ExtraKey], count: int,
              start: Sequence[int] = ()) -> list[int]:
        """Chain hashes of the first `count` full pages of `tokens` (continuing `start`, hashes already known)."""
        hashes = list(start[:count])
        p = self.page_size
        for i in range(len(hashes), count):
            parent = hashes[-1] if hashes else None
            hashes.append(page_hash(parent, tokens[i * p : (i + 1) * p], extra_keys_of(extra, i * p, (i + 1) * p)))
        return hashes

    def lookup(self, tokens: Sequence[int], extra: Sequence[ExtraKey] = (), limit: int | None = None) -> list[int]:
        """The pages of the longest indexed prefix of full pages of `tokens` (at most `limit` positions).
        Takes nothing: `adopt` does."""
        if not self.prefix_cache:
            return []
        n = len(tokens) if limit is None else min(limit, len(tokens))
        pages, parent, p = [], None, self.page_size
        for i in range(n // p):
            parent = page_hash(parent, tokens[i * p : (i + 1) * p], extra_keys_of(extra, i * p, (i + 1) * p))
            page = self.index.get(parent)
            if page is None:
                break
            pages.append(page)
        return pages

    def adoption_cost(self, pages: Sequence[int]) -> int:
        """Available pages that adopting `pages` uses up (the cached unreferenced ones among them)."""
        return sum(1 for page in pages if self.refs[page] == 0)

    def adopt(self, table: PageTable, pages: Sequence[int], tokens: Sequence[int], queried: int = 0) -> int:
        """Start the empty `table` with the looked-up `pages` (their tokens: the first len(pages) pages of
        `tokens`), taking a reference on each. `queried`: the prompt tokens this lookup was for (statistics).
        Returns the positions reused."""
        if table.pages or table.tokens:
            raise NLDError("adopt needs an empty page table")
        for page in pages:
            if page not in self.page_hash:
                raise NLDError(f"page {page} is not in the prefix index")
            if self.refs[page] == 0:
                del self.lru[page]
            self.refs[page] += 1
        n = len(pages) * self.page_size
        table.pages = list(pages)
        table.tokens = list(tokens[:n])
        table.hashes = [self.page_hash[page] for page in pages]
        table.cached = n
        self.stats.queries += queried
        self.stats.hits += min(n, queried)
        return n

    # taking and giving back pages ---------------------------------------------------------------------
    def grow(self, table: PageTable, positions: int) -> bool:
        """Give `table` pages up to `positions` positions, evicting cached unreferenced pages least recently
        used first when no page is free. False (and nothing taken) if the pool cannot."""
        need = self.shortfall(table, positions)
        if need > self.available:
            return False
        evicted = []
        for _ in range(need):
            if self.free:
                page = self.free.pop()
            else:
                page, _ = self.lru.popitem(last=False)
                evicted.append(self.page_hash.pop(page))
                del self.index[evicted[-1]]
            self.refs[page] = 1
            table.pages.append(page)
        if evicted:
            self._emit(PagesRemoved(tuple(evicted)))
        return True

    def commit(self, table: PageTable, tokens: Sequence[int]) -> None:
        """`tokens` became committed positions of `table`: every page they fill enters the prefix index (unless
        an equal page is indexed already, or prefix caching is off)."""
        if len(table.tokens) + len(tokens) > len(table.pages) * self.page_size:
            raise NLDError(f"cannot commit {len(tokens)} tokens after {len(table.tokens)}: the page table covers "
                           f"{len(table.pages) * self.page_size} positions")
        table.tokens.extend(tokens)
        if not self.prefix_cache:
            return
        full = len(table.tokens) // self.page_size
        if full <= len(table.hashes):
            return
        start = len(table.hashes)
        table.hashes = self.chain(table.tokens, table.extra, full, table.hashes)
        stored = []
        p = self.page_size
        for i in range(start, full):
            h, page = table.hashes[i], table.pages[i]
            if h in self.index or page in self.page_hash:
                continue
            self.index[h] = page
            self.page_hash[page] = h
            stored.append(StoredPage(h, table.hashes[i - 1] if i else None, tuple(table.tokens[i * p : (i + 1) * p]),
                                     extra_keys_of(table.extra, i * p, (i + 1) * p)))
        if stored:
            self._emit(PagesStored(tuple(stored), p))

    def release(self, table: PageTable) -> None:
        """Drop `table`'s references: its indexed pages stay cached (the first ones most recently used, so a
        prefix is evicted from its end), the others are free. The table keeps its tokens (a preempted sequence
        resumes from them)."""
        for page in reversed(table.pages):
            self.refs[page] -= 1
            if self.refs[page] < 0:
                raise NLDError(f"page {page} released more often than taken")
            if self.refs[page] == 0:
                if page in self.page_hash:
                    self.lru[page] = None
                else:
                    self.free.append(page)
        table.pages = []

    def clear(self) -> None:
        """Empty the prefix index (pages in use stay with their sequences; cached ones become free)."""
        for page in self.lru:
            self.free.append(page)
        self.lru.clear()
        self.index.clear()
        self.page_hash.clear()
        self._emit(CacheCleared())

    def _emit(self, event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    # checks ---------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Every page is exactly one of free, cached-unreferenced or referenced; the index is consistent."""
        free, lru = set(self.free), set(self.lru)
        if len(free) != len(self.free) or free & lru:
            raise AssertionError("a page is listed twice among free and cached pages")
        for page in range(self.total):
            states = (page in free) + (page in lru) + (self.refs[page] > 0)
            if states != 1:
                raise AssertionError(f"page {page}: free={page in free} cached={page in lru} refs={self.refs[page]}")
        if lru - set(self.page_hash):
            raise AssertionError("a cached unreferenced page is not in the prefix index")
        if {self.index[h] for h in self.page_hash.values()} != set(self.page_hash) or len(self.index) != len(self.page_hash):
            raise AssertionError("the prefix index and its reverse map disagree")
