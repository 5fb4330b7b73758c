"""The PyTorch executor: the reference, on CPU or CUDA, and its fast path (compiled / graph-captured passes).

`compile=False` runs every pass eagerly with exact shapes (`kv.attend.PagedStep`): the reference the other
backends are tested against. `compile=True` runs the decode passes (batch buckets x chunk lengths) through
nld_trt/executors/static_pass.py: torch.compile on CPU, CUDA graphs on a GPU; other calls (prefill,
chunk lengths not prepared) still take the reference path, on the same KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import NLDError
from ..kv.attend import PagedCache, PagedStep
from ..kv.layout import DEFAULT_PAGE_SIZE, KVLayout, bytes_per_token, default_cache_tokens
from ..model import NLDModel, fuse_projections
from ..quant.kv import kv_scales
from .base import Executor, PassBatch
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
    """Why the model cannot take the compiled path (None: it can). Quantized linears keep host-side state of
    their own (dequantized-weight caches), and forward hooks run Python, so those models run eagerly."""
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"module {name or 'model'} has forward hooks"
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
    size); "static" runs the same static passes uncompiled. `progress` receives progress lines.

    The KV cache (nld_trt/kv/layout.py): `layout`, or one built from `kv_cache_tokens` / `kv_cache_gb` (at
    most one; neither: max_batch x max_seq_len positions, on a GPU at most 80% of its free memory) in pages
    of `page_size`; an FP8 KV-cache checkpoint's scales make it an FP8 cache."""

    def __init__(self, model: NLDModel, max_batch: int = 8, max_seq_len: int = 2048, max_chunk: int = 128,
                 kernels: bool | None = None, compile: bool | str = False, chunk_lens: Sequence[int] | None = None,
                 batch_buckets: Sequence[int] | None = None, progress: Progress | None = None,
                 kv_cache_tokens: int | None = None, kv_cache_gb: float | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE, layout: KVLayout | None = None) -> None:
        p = next(model.parameters())
        if layout is None:
            scales = kv_scales(model)
            c = model.config
            per_token = bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                                        torch.float8_e4m3fn if scales else p.dtype)
            layout = KVLayout.build(c, max_seq_len, p.dtype, tokens=kv_cache_tokens, gb=kv_cache_gb,
                                    page_size=page_size, scales=scales,
                                    default_tokens=default_cache_tokens(p.device, max_batch, max_seq_len, per_token))
        super().__init__(model.config, layout, max_batch, max_chunk)
        self.model = model.eval()
        self.kernels = (p.device.type == "cuda" and kernels_available()) if kernels is None else kernels
        kind = compile_kind(p.device, self.kernels, compile)
        self.cache = PagedCache(layout, p.device)
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
            self.passes = PASSES[kind](model, self.cache, self.kernels, buckets, chunks, progress)

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

    def forward(self, batch: PassBatch) -> torch.Tensor:
        lens = self.check_pass(batch)
        images = any(r.chunk.embeds is not None for r in batch.rows)  # image prefill chunks take the eager path
        shape = None if self.passes is None or images else self.passes.shape_for(len(lens), max(lens))
        if shape is None:
            return super().forward(batch)
        all_logits = batch.all_logits
        last_only = not all_logits or all(r.chunk.last_logits_only for r in batch.rows)
        b = len(lens)
        with torch.inference_mode():  # inputs made as at compile time (inference tensors), or dynamo recompiles
            host = PassInputs.pack(shape, self.layout, batch.rows, pin=self.device.type == "cuda")
            hidden, inputs = self.passes.run(host)
            hidden = hidden[:b]
            if last_only:
                hidden = hidden[torch.arange(b, device=hidden.device), inputs.chunk_lens[:b] - 1]
            logits = self.model.logits(hidden).float()
        if last_only and all_logits:  # every chunk reads its last row only: show that row at every position
            return logits[:, None].expand(b, shape.chunk, logits.shape[-1])
        return logits

    @torch.inference_mode()
    def _forward(self, tokens, tables, chunk_lens, block, lora, committed, all_logits, embeds=()):
        b, t = tokens.shape
        positions = committed[:, None] + torch.arange(t, device=tokens.device)
        keys = int((committed + chunk_lens).max())
        step = PagedStep.build(self.cache, tables, committed, chunk_lens, block, t, keys, self.kernels)
        lora_rows = lora if (self.model.has_lora and bool(lora.any())) else None
        x = None
        if embeds:  # image rows replace their positions' token embeddings
            x = self.model.embed(tokens)
            for row, e in embeds:
                x[row, torch.tensor(e.positions, device=x.device)] = e.rows.to(x.device, x.dtype)
        hidden = self.model(tokens, positions, None, step, lora_rows, inputs_embeds=x)
        if not all_logits:
            hidden = hidden[torch.arange(b, device=hidden.device), chunk_lens - 1]
        return self.model.logits(hidden).float()
