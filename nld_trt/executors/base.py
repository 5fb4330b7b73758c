"""The executor interface: the only thing the decoding loops know about the model.

An executor holds the tensors of a paged KV cache (its `KVLayout`, nld_trt/kv) and runs one forward pass
over a `PassBatch`: per row a chunk of tokens (its own attention pattern and LoRA switch; image rows for a
prefill chunk of an image prompt), the row's committed length L and its page table. It writes the chunk's
K/V at L..L+n-1 of the row's pages and returns the head's logits. It keeps no allocation state: which pages a sequence holds, what is committed and what
is cached is the batcher's (nld_trt/kv/pages.py, nld_trt/decoding/driver.py). The PyTorch executor
implements `_forward`; ONNX Runtime and TensorRT executors implement the same method and inherit
everything else (checks, padding).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from ..config import NLDConfig
from ..errors import GenerationError
from ..kv.layout import KVLayout


@dataclass(frozen=True)
class ChunkEmbeds:
    """Embedding rows that replace some chunk positions' token embeddings: an image's projector rows at its
    `<|image_pad|>` positions, in a prefill chunk (nld_trt/vision/encoder.py makes them)."""

    positions: tuple[int, ...]  # indices into the chunk's tokens
    rows: torch.Tensor  # [len(positions), hidden]


@dataclass(frozen=True)
class Chunk:
    """What a sequence feeds in one pass: tokens at positions L.., the pattern, the draft adapter switch, and
    (prefill chunks of image prompts only) embedding rows for some positions."""

    tokens: list[int]
    block: bool = False  # bidirectional within the chunk (else causal)
    lora: bool = False  # add the linear_spec draft adapter to o_proj
    # Only the last position's logits will be read (e.g. dlm's commit pass). A hint: an executor may then
    # compute the head for the last position alone, and a call whose chunks all say so may return that row
    # at every position.
    last_logits_only: bool = False
    embeds: ChunkEmbeds | None = field(default=None, compare=False)


@dataclass(frozen=True)
class PassRow:
    """One row of a pass: a chunk at positions committed.., and the row's page table (physical pages of its
    positions 0, P, 2P, ..., covering at least committed + len(chunk.tokens) positions)."""

    chunk: Chunk
    committed: int
    pages: Sequence[int]


@dataclass(frozen=True)
class PassBatch:
    rows: Sequence[PassRow]
    all_logits: bool = True  # False: only each chunk's last position's logits, [B, V]


class Executor(ABC):
    """Checks and padding shared by every executor; subclasses implement `_forward`."""

    # page tables padded to the layout's full width (an engine graph's fixed input shape), else only as wide
    # as the pass's longest row needs
    full_tables = False

    def __init__(self, config: NLDConfig, layout: KVLayout, max_batch: int, max_chunk: int) -> None:
        if max_batch < 1 or max_chunk < 1:
            raise GenerationError("max_batch and max_chunk must be positive")
        self.config = config
        self.layout = layout
        self.max_batch = max_batch  # rows per pass at most: the most sequences decoding at once
        self.max_seq_len = layout.max_seq_len
        self.max_chunk = max_chunk  # longest decode chunk (block length) an executor accepts
        self.max_prefill_chunk = layout.max_seq_len  # prompts longer than this are prefilled in pieces

    # the pass -------------------------------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        return False

    @property
    def takes_embeds(self) -> bool:
        """Whether `_forward` takes embedding rows for image positions (`Chunk.embeds`)."""
        return False

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, batch: PassBatch) -> torch.Tensor:
        """One pass. Returns float32 logits [B, T, V] (T = longest chunk; rows past a chunk's end are
        padding), or with `all_logits=False` only each chunk's last position, [B, V]. When every chunk reads
        its last position only (`Chunk.last_logits_only`), only those rows are computed and shown at every
        position."""
        lens = self.check_pass(batch)
        rows = batch.rows
        t = max(lens)
        if batch.all_logits and all(r.chunk.last_logits_only for r in rows):
            plain = [replace(r, chunk=replace(r.chunk, last_logits_only=False)) for r in rows]
            last = self.forward(PassBatch(plain, all_logits=False))
            return last[:, None].expand(len(rows), t, last.shape[-1])
        dev = self.device
        tokens = torch.zeros(len(rows), t, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : lens[i]] = torch.tensor(r.chunk.tokens, dtype=torch.long)
        embeds = [(i, r.chunk.embeds) for i, r in enumerate(rows) if r.chunk.embeds is not None]
        extra = {"embeds": embeds} if embeds else {}  # executors without an embeddings input never see the key
        return self._forward(
            tokens=tokens.to(dev),
            tables=self.page_tables(batch, self.layout.table_width if self.full_tables else
                                    max(self.layout.pages_for(r.committed + n) for r, n in zip(rows, lens))).to(dev),
            chunk_lens=torch.tensor(lens, dtype=torch.long, device=dev),
            block=torch.tensor([r.chunk.block for r in rows], dtype=torch.bool, device=dev),
            lora=torch.tensor([r.chunk.lora for r in rows], dtype=torch.bool, device=dev),
            committed=torch.tensor([r.committed for r in rows], dtype=torch.long, device=dev),
            all_logits=batch.all_logits,
            **extra,
        )

    def page_tables(self, batch: PassBatch, width: int) -> torch.Tensor:
        """[B, width] int64: each row's first `width` pages, padded with the scratch page."""
        scratch = self.layout.scratch
        return torch.tensor([list(r.pages[:width]) + [scratch] * (width - min(len(r.pages), width)) for r in batch.rows],
                            dtype=torch.long)

    def check_pass(self, batch: PassBatch) -> list[int]:
        """Refuse a call that does not fit (clear errors); returns the chunk lengths."""
        rows = batch.rows
        if not rows:
            raise GenerationError("forward needs at least one row")
        if len(rows) > self.max_batch:
            raise GenerationError(f"a pass of {len(rows)} rows is over this executor's max_batch {self.max_batch}")
        lens = [len(r.chunk.tokens) for r in rows]
        for c, n in zip((r.chunk for r in rows), lens):
            if c.embeds is None:
                continue
            if not self.takes_embeds:
                raise GenerationError(f"{type(self).__name__} has no input for image embeddings (a text model's graph, "
                                      "or an engine build of an older nld-trt): rebuild it with nld-trt build, or run "
                                      "the checkpoint")
            if c.embeds.rows.shape != (len(c.embeds.positions), self.config.hidden_size) or not all(
                    0 <= p < n for p in c.embeds.positions):
                raise GenerationError(f"embedding rows {list(c.embeds.rows.shape)} at chunk positions "
                                      f"{list(c.embeds.positions)[:4]}... do not fit a chunk of {n} tokens and width "
                                      f"{self.config.hidden_size}")
        p = self.layout.page_size
        for r, n in zip(rows, lens):
            if n < 1:
                raise GenerationError("empty chunk")
            if r.committed < 0 or r.committed + n > self.max_seq_len:
                raise GenerationError(
                    f"the chunk ({n} tokens after {r.committed}) does not fit in the KV cache "
                    f"({self.max_seq_len} positions)"
                )
            if len(r.pages) * p < r.committed + n:
                raise GenerationError(f"the page table ({len(r.pages)} pages of {p}) does not cover the chunk "
                                      f"({n} tokens after {r.committed})")
        return lens

    @abstractmethod
    def _forward(
        self,
        tokens: torch.Tensor,
        tables: torch.Tensor,
        chunk_lens: torch.Tensor,
        block: torch.Tensor,
        lora: torch.Tensor,
        committed: torch.Tensor,
        all_logits: bool,
    ) -> torch.Tensor:
        """tokens [B, T] long (right-padded), tables [B, W] long (page tables, scratch-padded),
        chunk_lens/committed [B] long, block/lora [B] bool; an executor that `takes_embeds` also gets
        `embeds`, [(row, ChunkEmbeds)], when some chunk carries image rows. Writes the chunk's K/V at
        committed..committed+n-1 of each row's pages; returns float32 logits."""
