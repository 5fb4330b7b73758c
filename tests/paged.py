"""Driving an executor pass by pass in tests: page tables from the executor's own page manager (so the pages a
test takes are never pages some NLD's prefix cache holds), the chunk fed last remembered for `commit`."""

from __future__ import annotations

from nld_trt.decoding.driver import page_manager
from nld_trt.executors.base import PassBatch, PassRow
from nld_trt.kv.pages import PageManager, PageTable


class Pager:
    def __init__(self, executor, pages: PageManager | None = None) -> None:
        self.executor = executor
        self.pages = pages if pages is not None else page_manager(executor)
        self._last: dict[int, list[int]] = {}

    def allocate(self) -> PageTable:
        return PageTable()

    def forward(self, tables: list[PageTable], chunks, all_logits: bool = True):
        """One pass of `chunks` after each table's committed tokens (tables grow to cover them)."""
        for t, c in zip(tables, chunks):
            assert self.pages.grow(t, t.length + len(c.tokens)), "out of pages"
            self._last[id(t)] = list(c.tokens)
        rows = [PassRow(c, t.length, list(t.pages)) for t, c in zip(tables, chunks)]
        return self.executor.forward(PassBatch(rows, all_logits))

    def commit(self, table: PageTable, count: int) -> None:
        """Make the first `count` positions of the table's last chunk committed."""
        self.pages.commit(table, self._last[id(table)][:count])

    def release(self, table: PageTable) -> None:
        self.pages.release(table)
