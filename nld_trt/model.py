"""The one NLD model definition: the Ministral 3 backbone, `diffusion_head`, a per-sequence KV cache.

Numerically the same as transformers' `Ministral3Model` plus a linear head (tests/test_backbone_parity.py
pins it to 1e-4). The rotary frequencies and the YaRN attention factor come from transformers' own rope
initialisation, so the two cannot drift apart. Parameter names are those of the release checkpoint
(`encoder.*`, `diffusion_head.weight`), so a checkpoint's safetensors load with `load_state_dict`.

Two ways of attending share this code: a causal or block pass over a chunk against the paged KV cache,
and a cache-free pass under any explicit mask (training, calibration). A pass against the cache is described
by a step object from nld_trt/kv/attend.py (`PagedStep`, the reference, or `StaticPagedStep`, what
nld_trt/executors/static_pass.py compiles and captures in CUDA graphs): each layer hands it its K/V and
queries (`step.attend`), and the step writes them into the pages and attends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import NLDConfig

if TYPE_CHECKING:
    from .kv.attend import PagedStep, StaticPagedStep

    Step = PagedStep | StaticPagedStep


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
        # FP8 KV-cache emulation on cache-free passes (calibration, comparisons): (k, v) -> fake-quantized
        # (k, v). Passes against the cache quantize through the cache's layout instead (nld_trt/kv).
        self.kv_quant = None
        self.qkv_weight: torch.Tensor | None = None  # [q; k; v] rows, set by fuse_projections

    def forward(self, x, cos, sin, qscale, mask, layer: int, step: Step | None, lora_rows,
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
        if step is not None:
            out = step.attend(layer, q, k, v, self.scale)
        else:
            if self.kv_quant is not None:
                k, v = self.kv_quant(k, v)
            out = attention(q, k, v, mask, self.scale)
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
        step: Step | None = None,
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
                 step: Step | None = None, lora_rows: torch.Tensor | None = None,
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


def norm_weights(module: nn.Module) -> set[int]:
    """The ids of `module`'s RMSNorm weights (found by type: names vary, e.g. Pixtral's `ln_pre`)."""
    return {id(m.weight) for m in module.modules() if isinstance(m, RMSNorm)}


def init_weights(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Random initialisation (normal linears and embeddings, unit norms) for tiny test models: an `NLDModel`, or
    the vision tower and projector beside it."""
    g = torch.Generator().manual_seed(seed)
    norms = norm_weights(model)
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in norms:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
