"""What the prefix cache reports when it changes, for whoever routes requests by KV reuse.

A page enters the prefix index when it fills with committed tokens (`PagesStored`, in chain order: each
page with its hash, its parent's hash, its token ids and the extra keys that entered its hash), leaves it
when it is evicted (`PagesRemoved`), and everything leaves at once on `CacheCleared`. A KV-aware router
(Dynamo's, relayed by a worker) keeps its own index of which worker holds which prefix from these; the
worker's block size is our page size. Hashes are unsigned 64-bit ints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class ExtraKey:
    """Something besides token ids that changes the KV of prompt positions start..end-1 (a VLM's image at its
    pad positions): two prompts with the same ids but different digests never share those pages."""

    start: int
    end: int
    digest: bytes


@dataclass(frozen=True)
class StoredPage:
    hash: int
    parent_hash: int | None  # None: the sequence's first page
    token_ids: tuple[int, ...]
    extra_keys: tuple[ExtraKey, ...] = ()


@dataclass(frozen=True)
class PagesStored:
    pages: tuple[StoredPage, ...]  # in chain order: each page's parent is the previous one (or stored before)
    page_size: int


@dataclass(frozen=True)
class PagesRemoved:
    hashes: tuple[int, ...]


@dataclass(frozen=True)
class CacheCleared:
    pass


KVEvent = Union[PagesStored, PagesRemoved, CacheCleared]
EventCallback = Callable[[KVEvent], None]
