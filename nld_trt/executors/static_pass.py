"""Static-shape decoding passes for the PyTorch executor: compiled with torch.compile (CPU) or captured in
CUDA graphs (GPU), the eager reference kept beside them.

Why: an eager pass runs op by op from Python and reads lengths back from the device to size its tensors.
On a GPU a decode step of a large model is then bound by kernel launches and host round trips, not by its
weight reads; on a CPU, by Python. Decode passes come in few shapes (a batch of 1-token `ar` steps, or of
block-length `dlm`/`linear_spec` chunks), so each (batch bucket, chunk length) pair gets one pass whose
shapes are fixed and whose lengths, page tables and masks live on the device (`kv.attend.StaticPagedStep`):
- the batch is padded up to a bucket (1, 2, 4, 8, ... and max_batch); padding rows write and read only the
  cache's scratch page and their outputs are dropped; page tables are padded with the scratch page to a fixed
  width (the layout's table width, plus one column that is always the scratch page);
- on CPU the pass is compiled with inductor, once per pair (the number of cache positions attention reads
  is its one dynamic size); on CUDA it is captured as a CUDA graph at load, the Triton KV-write and attention kernels
  inside (they read page tables and committed lengths on the device), as SGLang and vLLM do for decode;
- prefill chunks and other chunk lengths run the eager reference path.
The bookkeeping (buckets, padding, which shape serves which call) is plain Python, tested without a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import NLDError
from ..kv.attend import PagedCache, StaticPagedStep
from ..kv.layout import KVLayout
from ..model import NLDModel

MIN_KEYS = 2  # the compiled pass's dynamic size never takes the values 0 or 1 (torch.compile specializes them)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below max_batch, then max_batch itself: 1, 2, 4, 8, ..., max_batch."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return (*buckets, max_batch)


def pick_bucket(buckets: Sequence[int], batch: int) -> int | None:
    """The smallest bucket that holds `batch` rows (None: larger than every bucket)."""
    return next((b for b in sorted(buckets) if b >= batch), None)


@dataclass(frozen=True, order=True)
class PassShape:
    batch: int  # rows, padding included
    chunk: int  # chunk length T

    def __str__(self) -> str:
        return f"{self.batch}x{self.chunk}"


class PassInputs:
    """One pass's int64 inputs packed in a single tensor (one host-to-device copy per pass): tokens [B, T],
    page tables [B, W], then committed, chunk_lens, block, lora [B] each. `keys`: the positions attention
    must read, max(committed + chunk length) over all rows."""

    def __init__(self, packed: torch.Tensor, shape: PassShape, width: int, keys: int = MIN_KEYS) -> None:
        b, t = shape.batch, shape.chunk
        self.packed, self.shape, self.width, self.keys = packed, shape, width, keys
        self.tokens = packed[: b * t].view(b, t)
        self.tables = packed[b * t : b * t + b * width].view(b, width)
        rest = packed[b * t + b * width :].view(4, b)
        self.committed, self.chunk_lens, self.block, self.lora = rest.unbind(0)

    @staticmethod
    def columns(layout: KVLayout) -> int:
        """Page-table columns of a static pass: the layout's table, plus one always the scratch page (every
        read is then a strict prefix of the table)."""
        return layout.table_width + 1

    @classmethod
    def padding(cls, shape: PassShape, layout: KVLayout, device: torch.device | str = "cpu") -> PassInputs:
        """Every row a padding row: what warm-up, compilation and capture run (they write only the scratch page)."""
        return cls.pack(shape, layout, [])._to(device)

    @classmethod
    def pack(cls, shape: PassShape, layout: KVLayout, rows: Sequence, pin: bool = False) -> PassInputs:
        """The host-side inputs of a call: its `PassRow`s, chunks right-padded to shape.chunk and page tables to
        the static width with the scratch page, then padding rows up to shape.batch (page table all scratch,
        committed 0, a chunk of T padding tokens)."""
        b, t = shape.batch, shape.chunk
        width, scratch = cls.columns(layout), layout.scratch
        pad = b - len(rows)
        lens = [len(r.chunk.tokens) for r in rows]
        if pad < 0 or max(lens, default=0) > t:
            raise ValueError(f"{len(rows)} rows with chunks of up to {max(lens, default=0)} tokens do not fit a {shape} pass")
        values = [tok for r in rows for tok in (*r.chunk.tokens, *[0] * (t - len(r.chunk.tokens)))] + [0] * (pad * t)
        for r in rows:
            pages = list(r.pages[: width - 1])
            values += pages + [scratch] * (width - len(pages))
        values += [scratch] * (pad * width)
        values += [r.committed for r in rows] + [0] * pad + lens + [t] * pad
        values += [bool(r.chunk.block) for r in rows] + [False] * pad + [bool(r.chunk.lora) for r in rows] + [False] * pad
        packed = torch.tensor(values, dtype=torch.long)
        if pin:
            packed = packed.pin_memory()
        keys = max(MIN_KEYS, t, *(r.committed + n for r, n in zip(rows, lens)))
        return cls(packed, shape, width, keys)

    def _to(self, device) -> PassInputs:
        return PassInputs(self.packed.to(device), self.shape, self.width, self.keys)


def static_forward(model: NLDModel, cache: PagedCache, kernels: bool, tokens: torch.Tensor, tables: torch.Tensor,
                   committed: torch.Tensor, chunk_lens: torch.Tensor, block: torch.Tensor, lora: torch.Tensor,
                   key_positions: torch.Tensor | None) -> torch.Tensor:
    """The pass: hidden states [B, T, H] of `PassInputs` tensors, with no host synchronisation.
    key_positions: a tensor whose length is the positions attention reads (None with kernels, which read
    the lengths themselves). The draft adapter applies to the `lora` rows (on all others it adds 0)."""
    t = tokens.shape[1]
    step = StaticPagedStep.build(cache, tables, committed, chunk_lens, block.bool(), t, key_positions, kernels)
    positions = committed[:, None] + torch.arange(t, device=tokens.device)
    lora_rows = lora.bool() if model.has_lora else None
    return model(tokens, positions, None, step, lora_rows, fused=True)


Progress = Callable[[str], None]


class StaticPasses:
    """The pass of each (batch bucket, chunk length) shape. `run` takes host-side `PassInputs` and returns
    the hidden states [B, T, H] and the device copy of the inputs (valid until the next pass)."""

    kind = "static"  # the uncompiled static pass: what the others compile, run as plain PyTorch

    def __init__(self, model: NLDModel, cache: PagedCache, kernels: bool, buckets: Sequence[int],
                 chunk_lens: Sequence[int], progress: Progress | None = None) -> None:
        self.model, self.cache, self.layout, self.kernels = model, cache, cache.layout, kernels
        self.buckets = tuple(sorted(set(buckets)))
        self.chunk_lens = tuple(sorted(set(chunk_lens)))
        self.shapes = [PassShape(b, t) for t in self.chunk_lens for b in self.buckets]
        self.device = cache.k[0].device
        # every position a static pass can read: the table's columns x P (the last column always the scratch
        # page, so a read of all real pages is a strict prefix)
        self.positions = torch.arange(PassInputs.columns(self.layout) * self.layout.page_size, device=self.device)
        self.progress = progress
        self.report = ""

    def shape_for(self, batch: int, chunk: int) -> PassShape | None:
        """Which pass serves a call of `batch` rows whose longest chunk is `chunk` (None: the eager path)."""
        bucket = pick_bucket(self.buckets, batch)
        return PassShape(bucket, chunk) if bucket is not None and chunk in self.chunk_lens else None

    def _call(self, fn, inputs: PassInputs) -> torch.Tensor:
        keys = None if self.kernels else self.positions[: inputs.keys]
        return fn(self.model, self.cache, self.kernels, inputs.tokens, inputs.tables, inputs.committed,
                  inputs.chunk_lens, inputs.block, inputs.lora, keys)

    def run(self, host: PassInputs) -> tuple[torch.Tensor, PassInputs]:
        inputs = host._to(self.device)
        return self._call(static_forward, inputs), inputs

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


class InductorPasses(StaticPasses):
    """CPU: the static pass compiled by torch.compile (inductor, whole graph) for every shape, at load."""

    kind = "inductor"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # cpp_wrapper: the compiled graph's launcher in C++ instead of Python (measured 5-10% off a 1-token pass)
        self.fn = torch.compile(static_forward, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
        start = time.perf_counter()
        # one compiled graph per shape (and per executor): dynamo's default limit of 8 would silently run
        # the rest eagerly
        with torch._dynamo.config.patch(recompile_limit=1 << 16, accumulated_recompile_limit=1 << 16):
            for i, shape in enumerate(self.shapes):
                self._say(f"compiling the forward pass {i + 1}/{len(self.shapes)} (batch x chunk {shape})...")
                t0 = time.perf_counter()
                self._call(self.fn, PassInputs.padding(shape, self.layout))
                self._say(f"  {shape}: {time.perf_counter() - t0:.1f} s")
        self.seconds = time.perf_counter() - start
        self.report = (f"compiled {len(self.shapes)} forward passes (batch {','.join(map(str, self.buckets))} x chunk "
                       f"{','.join(map(str, self.chunk_lens))}) with torch.compile in {self.seconds:.1f} s")
        self._say(self.report)

    def _call(self, fn, inputs: PassInputs) -> torch.Tensor:
        keys = self.positions[: inputs.keys]
        torch._dynamo.mark_dynamic(keys, 0, min=MIN_KEYS, max=self.layout.table_width * self.layout.page_size)
        return fn(self.model, self.cache, False, inputs.tokens, inputs.tables, inputs.committed,
                  inputs.chunk_lens, inputs.block, inputs.lora, keys)

    def run(self, host: PassInputs) -> tuple[torch.Tensor, PassInputs]:
        with torch._dynamo.config.patch(error_on_recompile=True):
            return self._call(self.fn, host), host


class CudaGraphPasses(StaticPasses):
    """CUDA: one CUDA graph per shape, captured at load (largest batch first, all in one memory pool), with
    the Triton kernels inside; a pass copies its packed inputs into the graph's buffer and replays it."""

    kind = "cuda-graphs"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.device.type != "cuda" or not self.kernels:
            raise NLDError("CUDA graphs need the model on a CUDA device and the Triton kernels (pip install triton)")
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[PassShape, tuple[torch.cuda.CUDAGraph, PassInputs, torch.Tensor]] = {}
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        start = time.perf_counter()
        order = sorted(self.shapes, key=lambda s: (s.chunk, s.batch), reverse=True)
        for i, shape in enumerate(order):
            self._say(f"capturing CUDA graph {i + 1}/{len(order)} (batch x chunk {shape})...")
            self.graphs[shape] = self._capture(shape)
        torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - start
        self.memory = free_before - torch.cuda.mem_get_info(self.device)[0]
        self.report = (f"captured {len(order)} CUDA graphs (batch {','.join(map(str, self.buckets))} x chunk "
                       f"{','.join(map(str, self.chunk_lens))}) in {self.seconds:.1f} s, "
                       f"{self.memory / 2**20:.0f} MiB of GPU memory")
        self._say(self.report)

    def _capture(self, shape: PassShape):
        inputs = PassInputs.padding(shape, self.layout, self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: Triton compiles its kernels, cuBLAS picks its algorithms
            for _ in range(2):
                self._call(static_forward, inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self._call(static_forward, inputs)
        return graph, inputs, hidden

    def run(self, host: PassInputs) -> tuple[torch.Tensor, PassInputs]:
        graph, inputs, hidden = self.graphs[host.shape]
        inputs.packed.copy_(host.packed, non_blocking=True)
        graph.replay()
        return hidden, inputs


PASSES: dict[str, type[StaticPasses]] = {p.kind: p for p in (StaticPasses, InductorPasses, CudaGraphPasses)}
