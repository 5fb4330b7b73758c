"""The one NLD model definition: the Ministral 3 backbone, `diffusion_head`, a per-sequence KV cache.

Numerically the same as transformers' `Ministral3Model` plus a linear head (tests/test_backbone_parity.py
pins it to 1e-4). The rotary frequencies and the YaRN attention factor come from transformers' own rope
initialisation, so the two cannot drift apart. Parameter names are those of the release checkpoint
(`encoder.*`, `diffusion_head.weight`), so a checkpoint's safetensors load with `load_state_dict`.

Three ways of attending share this code: a causal or block pass over a chunk against the KV cache
(`KVCache` + `attention.chunk_attention_mask`), and a cache-free pass under any explicit mask (training).
A pass against the cache is described by a step object: `CacheStep` (the reference: exact shapes, computed
on the host) or `StaticStep` (shapes fixed by batch bucket and chunk length, every length and mask on the
device: what nld_trt/executors/static_pass.py compiles and captures in CUDA graphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, chunk_attention_mask
from .config import NLDConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.promote_types(dtype, torch.float32))  # at least float32, as transformers
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_frequencies(config: NLDConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention factor, computed by transformers' own rope code."""
    hf = config.to_transformers()
    if config.rope.rope_type == "default":
        from transformers.models.ministral3.modeling_ministral3 import Ministral3RotaryEmbedding

        return Ministral3RotaryEmbedding.compute_default_rope_parameters(hf)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS[config.rope.rope_type](hf, None)


class Rotary(nn.Module):
    """cos/sin per position (YaRN-scaled) and the Ministral 3 per-position query scale."""

    def __init__(self, config: NLDConfig) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.beta = config.rope.llama_4_scaling_beta
        self.original_max = config.rope.original_max_position_embeddings or 1

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        qscale = 1 + self.beta * torch.log(1 + torch.floor(positions.float() / self.original_max))
        return cos, sin, qscale.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


@dataclass
class LoRA:
    """The linear-spec draft adapter on one o_proj: W_o + scale * B @ A, used only in draft passes."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.t() @ self.B.t()) * self.scale


class KVCache:
    """Keys and values of `slots` sequences, preallocated to `max_len` positions.

    The cache does not know committed lengths: the executor owns them. `write` stores a chunk's K/V at
    positions L..L+n-1 of each row's slot; `read` returns every slot's first `keys` positions.
    """

    def __init__(self, config: NLDConfig, slots: int, max_len: int, dtype: torch.dtype, device) -> None:
        shape = (slots, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def kernel_attend(cache: KVCache, layer: int, q, k, v, slots, committed, chunk_lens, block, scale: float):
    """Write k, v [B, Hkv, T, D] at committed..committed+n-1 of each row's slot and attend q [B, Hq, T, D] with
    the fused Triton kernels (the CUDA path). Lengths are read on the device: no host synchronisation."""
    from nld_trt.plugins.block_attention.ops import block_attention, write_kv

    kc, vc = cache.k[layer], cache.v[layer]
    write_kv(k, v, kc, vc, slots, committed, chunk_lens)
    return block_attention(q, kc, vc, slots, committed, chunk_lens, block, scale)


@dataclass
class CacheStep:
    """One forward pass against a KVCache (computed once, used by every layer): where the chunk's K/V go
    and how its queries attend. The reference path writes with index_put and attends with SDPA under the
    chunk mask; with `kernels` it runs the fused Triton kernels of nld_trt.plugins (the CUDA path)."""

    cache: KVCache
    slots: torch.Tensor  # [B] slot per batch row
    committed: torch.Tensor  # [B] committed length L per row
    chunk_lens: torch.Tensor  # [B] real chunk tokens per row
    block: torch.Tensor  # [B] bool: bidirectional chunk
    mask: torch.Tensor  # [B, 1, T, keys] bool, the reference path's attention mask
    write_rows: torch.Tensor  # [N] batch row of each real chunk token
    write_cols: torch.Tensor  # [N] chunk index of each real chunk token
    write_pos: torch.Tensor  # [N] absolute position of each real chunk token
    keys: int  # how many positions to read (max over rows of L + n)
    contiguous_from: int | None  # slots are start..start+B-1: read through a view
    kernels: bool = False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        dest = self.slots[self.write_rows]
        kc[dest, :, self.write_pos] = k[self.write_rows, :, self.write_cols]
        vc[dest, :, self.write_pos] = v[self.write_rows, :, self.write_cols]
        if self.contiguous_from is not None:
            s = self.contiguous_from
            b = self.slots.shape[0]
            return kc[s : s + b, :, : self.keys], vc[s : s + b, :, : self.keys]
        return kc[self.slots, :, : self.keys], vc[self.slots, :, : self.keys]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Write the chunk's k, v [B, Hkv, T, D] into the cache, then attend q [B, Hq, T, D]."""
        if not self.kernels:
            k_all, v_all = self.update(layer, k, v)
            return attention(q, k_all, v_all, self.mask, scale)
        return kernel_attend(self.cache, layer, q, k, v, self.slots, self.committed, self.chunk_lens, self.block, scale)


@dataclass
class StaticStep:
    """One pass whose shapes depend only on (batch B, chunk length T) and which reads no tensor on the host,
    so it can be compiled once per shape and captured in a CUDA graph.

    Every row writes all T chunk positions: real tokens at committed..committed+n-1 of their slot, padding
    (chunk positions past n, and whole padding rows) to the scratch slot of the cache, which nothing reads
    as context. Without kernels, attention reads the first `keys` positions of each row's slot under the
    reference chunk mask (`keys` is the one size that varies between passes of a shape: the compiled pass
    takes it as a dynamic dimension); with kernels, the Triton kernels read the lengths on the device.
    """

    cache: KVCache
    slots: torch.Tensor  # [B] slot per batch row (padding rows: the scratch slot)
    committed: torch.Tensor  # [B]
    chunk_lens: torch.Tensor  # [B] real chunk tokens per row (padding rows: T, in the scratch slot)
    block: torch.Tensor  # [B] bool
    dest_slot: torch.Tensor  # [B, T] cache slot of each chunk position's K/V (padding: the scratch slot)
    dest_pos: torch.Tensor  # [B, T] cache position of each chunk position's K/V
    mask: torch.Tensor | None  # [B, 1, T, keys] bool (reference attention), None with kernels
    kernels: bool = False

    @classmethod
    def build(cls, cache: KVCache, scratch: int, slots, committed, chunk_lens, block, chunk: int, keys,
              kernels: bool = False) -> StaticStep:
        """From the pass's device tensors; `keys` (an int, or a symbolic size when compiled) is how many cache
        positions the reference attention reads: at least max(committed + chunk_lens)."""
        j = torch.arange(chunk, device=slots.device)
        real = j[None, :] < chunk_lens[:, None]
        dest_slot = torch.where(real, slots[:, None], scratch)
        dest_pos = torch.where(real, committed[:, None] + j, j)
        mask = None if kernels else chunk_attention_mask(committed, chunk_lens, block, chunk, keys)
        return cls(cache, slots, committed, chunk_lens, block, dest_slot, dest_pos, mask, kernels)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if self.kernels:
            return kernel_attend(self.cache, layer, q, k, v, self.slots, self.committed, self.chunk_lens, self.block,
                                 scale)
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[self.dest_slot, :, self.dest_pos] = k.transpose(1, 2)
        vc[self.dest_slot, :, self.dest_pos] = v.transpose(1, 2)
        keys = self.mask.shape[-1]
        return attention(q, kc[self.slots, :, :keys], vc[self.slots, :, :keys], self.mask, scale)


class Attention(nn.Module):
    def __init__(self, config: NLDConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.scale = d**-0.5
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        self.lora: LoRA | None = None
        self.qkv_weight: torch.Tensor | None = None  # [q; k; v] rows, set by fuse_projections

    def forward(self, x, cos, sin, qscale, mask, layer: int, step: CacheStep | StaticStep | None, lora_rows,
                fused: bool = False):
        b, t, _ = x.shape
        if fused and self.qkv_weight is not None:
            q, k, v = F.linear(x, self.qkv_weight).split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                                          self.n_kv * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin) * qscale[:, None, :, None]
        k = apply_rope(k, cos, sin)
        out = step.attend(layer, q, k, v, self.scale) if step is not None else attention(q, k, v, mask, self.scale)
        out = out.transpose(1, 2).reshape(b, t, -1)
        y = self.o_proj(out)
        if self.lora is not None and lora_rows is not None:
            y = y + self.lora.delta(out) * lora_rows.to(y.dtype).reshape(b, -1, 1)
        return y


class MLP(nn.Module):
    def __init__(self, config: NLDConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.gate_up_weight: torch.Tensor | None = None  # [gate; up] rows, set by fuse_projections

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused and self.gate_up_weight is not None:
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: NLDConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


class Encoder(nn.Module):
    def __init__(self, config: NLDConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class NLDModel(nn.Module):
    """Backbone + `diffusion_head`. `forward` gives hidden states; `logits` applies the head."""

    def __init__(self, config: NLDConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.diffusion_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, H]: the backbone's input, unless a caller replaces some rows (image positions)."""
        return self.encoder.embed_tokens(tokens)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        step: CacheStep | StaticStep | None = None,
        lora_rows: torch.Tensor | None = None,
        fused: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens/positions [B, T]; without a cache, mask [B, 1, T, T] bool (with one, the step holds it);
        lora_rows [B] or [B, T] bool: where the draft adapter applies; fused: one GEMM for q/k/v and one
        for gate/up where `fuse_projections` prepared them; inputs_embeds [B, T, H]: the backbone's input
        instead of `embed(tokens)` (a prefill chunk with image rows). Returns hidden states [B, T, H]."""
        return self.backbone(self.embed(tokens) if inputs_embeds is None else inputs_embeds, positions, mask, step,
                             lora_rows, fused)

    def backbone(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 step: CacheStep | StaticStep | None = None, lora_rows: torch.Tensor | None = None,
                 fused: bool = False) -> torch.Tensor:
        """The decoder layers and final norm over input embeddings x [B, T, H]."""
        cos, sin, qscale = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.encoder.layers):
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, qscale, mask, i, step, lora_rows, fused)
            x = x + layer.mlp(layer.post_attention_layernorm(x), fused)
        return self.encoder.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.diffusion_head(hidden)

    # ----------------------------------------------------------------------------------------------
    def set_lora(self, layers: dict[int, tuple[torch.Tensor, torch.Tensor]] | None,
                 scale: float | dict[int, float] = 1.0) -> None:
        """Install (or with None remove) the draft adapter: {layer: (A [r, in], B [out, r])}, with one scale
        or one per layer (PEFT's rank / alpha patterns)."""
        p = next(self.parameters())
        for i, layer in enumerate(self.encoder.layers):
            ab = (layers or {}).get(i)
            s = scale[i] if isinstance(scale, dict) else scale
            layer.self_attn.lora = (
                None if ab is None else LoRA(ab[0].to(p.device, p.dtype), ab[1].to(p.device, p.dtype), s)
            )

    @property
    def has_lora(self) -> bool:
        return any(layer.self_attn.lora is not None for layer in self.encoder.layers)


def fuse_projections(model: NLDModel) -> int:
    """Concatenate each layer's q/k/v weights and its gate/up weights into one tensor each (once, in place)
    and make the projections' weights views of it: one GEMM where there were three (two), no memory added,
    and the parameters keep the checkpoint's names and shapes (state_dict, ONNX export and the draft
    adapter see the same model). Projections that are not plain nn.Linear (quantized) stay unfused.
    Call it after the model has its device and dtype. Returns how many groups are fused."""

    def fuse(linears) -> torch.Tensor | None:
        if not all(type(m) is nn.Linear and m.bias is None for m in linears):
            return None
        with torch.no_grad():
            fused = torch.cat([m.weight.detach() for m in linears])
        start = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight = nn.Parameter(fused[start : start + rows], requires_grad=m.weight.requires_grad)
            start += rows
        return fused

    count = 0
    for layer in model.encoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_weight is None:
            attn.qkv_weight = fuse((attn.q_proj, attn.k_proj, attn.v_proj))
        if mlp.gate_up_weight is None:
            mlp.gate_up_weight = fuse((mlp.gate_proj, mlp.up_proj))
        count += (attn.qkv_weight is not None) + (mlp.gate_up_weight is not None)
    return count


def init_weights(model: NLDModel, std: float = 0.02, seed: int = 0) -> NLDModel:
    """Random initialisation (normal linears and embeddings, unit norms) for tiny test models."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
