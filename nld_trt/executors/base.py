"""The executor interface: the only thing the decoding loops know about the model.

An executor owns a KV cache of `max_batch` slots and, per slot, the committed length L. One call runs one
forward pass over a chunk per sequence (`forward`), each with its own attention pattern and LoRA switch,
and returns the head's logits; `commit` then makes k of the chunk's positions part of the cache. The
PyTorch executor implements `_forward`; ONNX Runtime and TensorRT executors implement the same method
and inherit everything else (slot bookkeeping, checks, padding).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import torch

from ..config import NLDConfig
from ..errors import GenerationError


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


class Executor(ABC):
    """Slot and length bookkeeping shared by every executor; subclasses implement `_forward`."""

    def __init__(self, config: NLDConfig, max_batch: int, max_seq_len: int, max_chunk: int) -> None:
        if max_batch < 1 or max_seq_len < 2 or max_chunk < 1:
            raise GenerationError("max_batch, max_seq_len and max_chunk must be positive")
        self.config = config
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.max_chunk = max_chunk  # longest decode chunk (block length) an executor accepts
        self.max_prefill_chunk = max_seq_len  # prompts longer than this are prefilled in pieces
        self.lengths = [0] * max_batch
        self._free = list(range(max_batch - 1, -1, -1))

    # slots ----------------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise GenerationError(f"all {self.max_batch} KV-cache slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free:
            return
        self.lengths[slot] = 0
        self._free.append(slot)

    def commit(self, slot: int, count: int) -> None:
        """Make the first `count` positions of the slot's last chunk part of its cache."""
        if count < 0 or self.lengths[slot] + count > self.max_seq_len:
            raise GenerationError(f"cannot commit {count} tokens to slot {slot} (length {self.lengths[slot]})")
        self.lengths[slot] += count

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

    def forward(self, slots: list[int], chunks: list[Chunk], all_logits: bool = True) -> torch.Tensor:
        """One pass. Returns float32 logits [B, T, V] (T = longest chunk; rows past a chunk's end are
        padding), or with `all_logits=False` only each chunk's last position, [B, V]. When every chunk reads
        its last position only (`Chunk.last_logits_only`), only those rows are computed and shown at every
        position."""
        lens = self.check_pass(slots, chunks)
        t = max(lens)
        if all_logits and all(c.last_logits_only for c in chunks):
            last = self.forward(slots, [replace(c, last_logits_only=False) for c in chunks], all_logits=False)
            return last[:, None].expand(len(chunks), t, last.shape[-1])
        dev = self.device
        tokens = torch.zeros(len(chunks), t, dtype=torch.long)
        for i, c in enumerate(chunks):
            tokens[i, : lens[i]] = torch.tensor(c.tokens, dtype=torch.long)
        embeds = [(i, c.embeds) for i, c in enumerate(chunks) if c.embeds is not None]
        extra = {"embeds": embeds} if embeds else {}  # executors without an embeddings input never see the key
        return self._forward(
            slots=torch.tensor(slots, dtype=torch.long, device=dev),
            tokens=tokens.to(dev),
            chunk_lens=torch.tensor(lens, dtype=torch.long, device=dev),
            block=torch.tensor([c.block for c in chunks], dtype=torch.bool, device=dev),
            lora=torch.tensor([c.lora for c in chunks], dtype=torch.bool, device=dev),
            committed=torch.tensor([self.lengths[s] for s in slots], dtype=torch.long, device=dev),
            all_logits=all_logits,
            **extra,
        )

    def check_pass(self, slots: list[int], chunks: list[Chunk]) -> list[int]:
        """Refuse a call that does not fit (clear errors); returns the chunk lengths."""
        if len(slots) != len(chunks) or not slots:
            raise GenerationError("forward needs one chunk per slot")
        lens = [len(c.tokens) for c in chunks]
        for c, n in zip(chunks, lens):
            if c.embeds is None:
                continue
            if not self.takes_embeds:
                raise GenerationError(f"{type(self).__name__} has no input for image embeddings yet: prompts with "
                                      "images run on the PyTorch executor (a checkpoint, not an engine build)")
            if c.embeds.rows.shape != (len(c.embeds.positions), self.config.hidden_size) or not all(
                    0 <= p < n for p in c.embeds.positions):
                raise GenerationError(f"embedding rows {list(c.embeds.rows.shape)} at chunk positions "
                                      f"{list(c.embeds.positions)[:4]}... do not fit a chunk of {n} tokens and width "
                                      f"{self.config.hidden_size}")
        for slot, n in zip(slots, lens):
            if n < 1:
                raise GenerationError("empty chunk")
            if self.lengths[slot] + n > self.max_seq_len:
                raise GenerationError(
                    f"the chunk ({n} tokens after {self.lengths[slot]}) does not fit in the KV cache "
                    f"({self.max_seq_len} positions)"
                )
        return lens

    @abstractmethod
    def _forward(
        self,
        slots: torch.Tensor,
        tokens: torch.Tensor,
        chunk_lens: torch.Tensor,
        block: torch.Tensor,
        lora: torch.Tensor,
        committed: torch.Tensor,
        all_logits: bool,
    ) -> torch.Tensor:
        """slots/chunk_lens/committed [B] long, tokens [B, T] long (right-padded), block/lora [B] bool.
        Writes the chunk's K/V at committed..committed+n-1 of each slot; returns float32 logits."""
