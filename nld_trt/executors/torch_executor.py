"""The PyTorch executor: the reference, on CPU or CUDA, and its fast path (compiled / graph-captured passes).

`compile=False` runs every pass eagerly with exact shapes (`model.CacheStep`): the reference the other
backends are tested against. `compile=True` runs the decode passes (batch buckets x chunk lengths) through
nld_trt/executors/static_pass.py: torch.compile on CPU, CUDA graphs on a GPU; other calls (prefill,
chunk lengths not prepared) still take the reference path, on the same KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..attention import chunk_attention_mask
from ..errors import NLDError
from ..model import CacheStep, KVCache, NLDModel, fuse_projections
from .base import Chunk, Executor
from . import static_pass
from .static_pass import PASSES, PassInputs, Progress


def kernels_available() -> bool:
    """Whether the fused Triton kernels can run (OpenAI Triton importable)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def compile_blocker(model: NLDModel) -> str | None:
    """Why the model cannot take the compiled path (None: it can). Quantized linears and the FP8 KV-cache
    emulation keep host-side state of their own (dequantized-weight caches, forward hooks), so those models
    run eagerly."""
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks or getattr(module, "kv_quant", None) is not None:
            return f"module {name or 'model'} has forward hooks or an FP8 KV-cache quantizer"
        if name.endswith(("_proj", "diffusion_head")) and type(module) is not nn.Linear:
            return f"module {name} is a {type(module).__name__} (a quantized linear), not a float nn.Linear"
    return None


def compile_kind(device: torch.device, kernels: bool, compile: bool | str) -> str | None:
    """What `compile` means on this device: None (the eager reference) or a static_pass.PASSES kind."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "cuda-graphs" if device.type == "cuda" else "inductor"
    if compile not in PASSES:
        raise NLDError(f"compile must be True, False or one of {', '.join(PASSES)}, got {compile!r}")
    return compile


class TorchExecutor(Executor):
    """`kernels`: run attention and the cache write with the fused Triton kernels (nld_trt.plugins).
    Default: on CUDA when Triton is installed; the reference path (index_put + SDPA) otherwise.

    `compile`: False, the eager reference; True, static decode passes compiled (CPU: torch.compile) or
    captured (CUDA graphs, which need the kernels) at construction, for every batch bucket (`batch_buckets`,
    default 1, 2, 4, ..., max_batch) and chunk length (`chunk_lens`, default 1 and the checkpoint's block
    size); "static" runs the same static passes uncompiled. `progress` receives progress lines."""

    def __init__(self, model: NLDModel, max_batch: int = 8, max_seq_len: int = 2048, max_chunk: int = 128,
                 kernels: bool | None = None, compile: bool | str = False, chunk_lens: Sequence[int] | None = None,
                 batch_buckets: Sequence[int] | None = None, progress: Progress | None = None) -> None:
        super().__init__(model.config, max_batch, max_seq_len, max_chunk)
        p = next(model.parameters())
        self.model = model.eval()
        self.kernels = (p.device.type == "cuda" and kernels_available()) if kernels is None else kernels
        kind = compile_kind(p.device, self.kernels, compile)
        # the fast path's padding writes go to one extra slot, `max_batch`, which no sequence gets; and one
        # extra position keeps every read a strict prefix of the cache (a compiled pass then needs no guard
        # on reading all of it)
        fast = kind is not None
        self.cache = KVCache(model.config, max_batch + fast, max_seq_len + fast, p.dtype, p.device)
        self.passes = None
        if kind is None:
            return
        blocker = compile_blocker(model)
        if blocker is not None:
            raise NLDError(f"the compiled forward runs float checkpoints, and {blocker}: use compile=False")
        fuse_projections(model)
        chunks = sorted({1, model.config.block_size} if chunk_lens is None else set(chunk_lens))
        chunks = [t for t in chunks if 1 <= t <= min(max_chunk, max_seq_len)]
        buckets = static_pass.batch_buckets(max_batch) if batch_buckets is None else sorted({b for b in batch_buckets if b >= 1})
        if not buckets or buckets[-1] > max_batch:
            raise NLDError(f"batch buckets must lie in [1, max_batch={max_batch}], got {list(batch_buckets or [])}")
        with torch.inference_mode():
            self.passes = PASSES[kind](model, self.cache, max_batch, self.kernels, buckets, chunks, progress)

    @property
    def has_lora(self) -> bool:
        return self.model.has_lora

    @property
    def takes_embeds(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def compile_report(self) -> str:
        """One line on what the fast path prepared at load ('' for the eager reference)."""
        return "" if self.passes is None else self.passes.report

    def forward(self, slots: list[int], chunks: list[Chunk], all_logits: bool = True) -> torch.Tensor:
        lens = self.check_pass(slots, chunks)
        images = any(c.embeds is not None for c in chunks)  # image prefill chunks take the eager path
        shape = None if self.passes is None or images else self.passes.shape_for(len(chunks), max(lens))
        if shape is None:
            return super().forward(slots, chunks, all_logits)
        last_only = not all_logits or all(c.last_logits_only for c in chunks)
        b = len(chunks)
        with torch.inference_mode():  # inputs made as at compile time (inference tensors), or dynamo recompiles
            host = PassInputs.pack(shape, self.max_batch, slots, chunks, [self.lengths[s] for s in slots],
                                   pin=self.device.type == "cuda")
            hidden, inputs = self.passes.run(host)
            hidden = hidden[:b]
            if last_only:
                hidden = hidden[torch.arange(b, device=hidden.device), inputs.chunk_lens[:b] - 1]
            logits = self.model.logits(hidden).float()
        if last_only and all_logits:  # every chunk reads its last row only: show that row at every position
            return logits[:, None].expand(b, shape.chunk, logits.shape[-1])
        return logits

    @torch.inference_mode()
    def _forward(self, slots, tokens, chunk_lens, block, lora, committed, all_logits, embeds=()):
        b, t = tokens.shape
        positions = committed[:, None] + torch.arange(t, device=tokens.device)
        keys = int((committed + chunk_lens).max())
        mask = None if self.kernels else chunk_attention_mask(committed, chunk_lens, block, t, keys)
        rows, cols = (torch.arange(t, device=tokens.device)[None, :] < chunk_lens[:, None]).nonzero(as_tuple=True)
        first = int(slots[0])
        contiguous = bool((slots == torch.arange(first, first + b, device=slots.device)).all())
        step = CacheStep(self.cache, slots, committed, chunk_lens, block, mask, rows, cols, positions[rows, cols],
                         keys, first if contiguous else None, self.kernels)
        lora_rows = lora if (self.model.has_lora and bool(lora.any())) else None
        x = None
        if embeds:  # image rows replace their positions' token embeddings
            x = self.model.embed(tokens)
            for row, e in embeds:
                x[row, torch.tensor(e.positions, device=x.device)] = e.rows.to(x.device, x.dtype)
        hidden = self.model(tokens, positions, mask, step, lora_rows, inputs_embeds=x)
        if not all_logits:
            hidden = hidden[torch.arange(b, device=hidden.device), chunk_lens - 1]
        return self.model.logits(hidden).float()
