"""The vision encoder: the Pixtral tower and the Mistral 3 projector, as plain PyTorch.

Numerically transformers' `PixtralVisionModel` + `Mistral3MultiModalProjector` (tests/test_vision_tower.py
pins it to 1e-4 in float32); the patch convolution runs as the matrix product it is. Module names follow the release checkpoint with its `encoder.` prefix removed
(`vision_tower.*`, `multi_modal_projector.*`), so its tensors load with `load_state_dict`.

One image is a grid of 14-pixel patches; the tower attends over all of them (no causal order). Several images
run as one sequence under a block-diagonal mask (each image sees only its own patches), as Pixtral does. Each
patch has a 2D rotary position (row, column): half of every head's frequency pairs rotate with the row, half
with the column. The projector normalises, merges each 2x2 block of patches into one row (its four patch
vectors concatenated channel-major, as `torch.nn.functional.unfold` orders them) and maps it to the text
model's width: one row per 28-pixel cell, in raster order. Those rows replace the image's `<|image_pad|>`
positions at prefill. Images of one size can also run as a batch (`VisionEncoder.forward_batch`, what training
uses): the same computation per image, with matrices large enough to run fast on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import MLP, RMSNorm, rotate_half
from .config import VLMConfig, VisionConfig

ACT = {"silu": F.silu, "gelu": F.gelu}  # gelu: the exact (erf) form, transformers' "gelu"


def axial_frequencies(config: VisionConfig) -> torch.Tensor:
    """[head_dim / 2] inverse frequencies: the even-indexed ones turn with the row, the odd-indexed with the column."""
    d = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


def axial_rotary(config: VisionConfig, grids: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] for the patches of every image (grids: patch rows x columns), in raster order."""
    inv = axial_frequencies(config).to(device)
    angles = []
    for rows, cols in grids:
        r = torch.arange(rows, device=device, dtype=torch.float32).repeat_interleave(cols)
        c = torch.arange(cols, device=device, dtype=torch.float32).repeat(rows)
        angles.append(torch.cat([r[:, None] * inv[0::2], c[:, None] * inv[1::2]], dim=-1))
    a = torch.cat(angles)
    a = torch.cat([a, a], dim=-1)
    return a.cos(), a.sin()


def block_diagonal_mask(lengths: list[int], device) -> torch.Tensor | None:
    """[1, 1, N, N] bool: True where a patch may attend (its own image); None for one image (no mask)."""
    if len(lengths) == 1:
        return None
    image = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    return (image[:, None] == image[None, :])[None, None]


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [N, d] (the patches of one sequence) or [B, N, d] (B images of one size, no mask)."""
        lead, n = x.shape[:-2], x.shape[-2]
        q, k, v = (p(x).view(*lead, n, self.heads, self.head_dim).transpose(-3, -2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if not lead:
            q, k, v = q[None], k[None], v[None]
        # SDPA's default scale is head_dim ** -0.5, Pixtral's (left implicit: torch's ONNX exporter fails on an
        # explicit scale in bfloat16)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(-3, -2)
        return self.o_proj(out.reshape(*lead, n, -1) if lead else out[0].reshape(n, -1))


class VisionMLP(MLP):
    """Pixtral's feed-forward: the backbone's gated MLP (same projections) with the tower's activation."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(config)
        self.act = ACT[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = VisionAttention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = VisionMLP(config)

    def forward(self, x, cos, sin, mask):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))


class VisionTower(nn.Module):
    """Pixtral: patch convolution, RMSNorm, then bidirectional layers with 2D rotary positions."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        p = config.patch_size
        self.patch_conv = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p, bias=False)
        self.ln_pre = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.transformer = VisionTransformer(config)

    def patches(self, image: torch.Tensor) -> torch.Tensor:
        """[3, H, W] -> [patches, hidden] in raster order ([B, 3, H, W] -> [B, patches, hidden]): the patch
        convolution (stride = kernel = patch) as one matrix product over the flattened patches (the same sums;
        and ONNX's Conv has no bfloat16 before opset 22, its MatMul has)."""
        if image.dim() == 3:
            return self.patches(image[None])[0]
        c, p = self.config.num_channels, self.config.patch_size
        w = self.patch_conv.weight
        rows, cols = image.shape[-2] // p, image.shape[-1] // p
        flat = image.to(w.dtype).reshape(-1, c, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
        return flat.reshape(image.shape[0], rows * cols, c * p * p) @ w.reshape(w.shape[0], -1).t()

    def forward(self, images: list[torch.Tensor], layer: int = -1) -> torch.Tensor:
        """images: [3, H, W] each (H, W multiples of the patch size). Returns [N, hidden]: for every patch of every
        image in raster order, the hidden state after `layer` (0: after ln_pre, k: after layer k, -1: the last)."""
        p = self.config.patch_size
        grids = [(img.shape[-2] // p, img.shape[-1] // p) for img in images]
        x = self.ln_pre(torch.cat([self.patches(img) for img in images]))
        cos, sin = axial_rotary(self.config, grids, x.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask = block_diagonal_mask([r * c for r, c in grids], x.device)
        for block in self.transformer.layers[: layer % (len(self.transformer.layers) + 1)]:
            x = block(x, cos, sin, mask)
        return x

    def forward_batch(self, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """images [B, 3, H, W] of one size -> [B, patches, hidden]: `forward` of each image, as one batch."""
        p = self.config.patch_size
        x = self.ln_pre(self.patches(images))
        cos, sin = axial_rotary(self.config, [(images.shape[-2] // p, images.shape[-1] // p)], x.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.transformer.layers[: layer % (len(self.transformer.layers) + 1)]:
            x = block(x, cos, sin, None)
        return x


class PatchMerger(nn.Module):
    def __init__(self, hidden: int, merge: int) -> None:
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(hidden * merge * merge, hidden, bias=False)

    def forward(self, features: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """features [N, d] (patches of every image, raster order) -> [cells, d]: each merge x merge block of an
        image's patches becomes one row holding its patch vectors channel-major (d, then block row, column)."""
        return self.merging_layer(torch.cat([self.cells(block, rows, cols) for block, (rows, cols) in
                                             zip(features.split([r * c for r, c in grids]), grids)]))

    def cells(self, block: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """One image's patches [rows x cols, d] ([B, rows x cols, d] for B images of one size) -> its merged cells
        [cells, d x merge x merge] ([B, cells, ...]), raster order, each cell's patch vectors channel-major."""
        if block.dim() == 2:
            return self.cells(block[None], rows, cols)[0]
        m, d = self.merge, block.shape[-1]
        g = block.reshape(block.shape[0], rows // m, m, cols // m, m, d).permute(0, 1, 3, 5, 2, 4)
        return g.reshape(block.shape[0], (rows // m) * (cols // m), d * m * m)

    def forward_batch(self, features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """[B, rows x cols, d] (B images of one size) -> [B, cells, d]."""
        return self.merging_layer(self.cells(features, rows, cols))


class Projector(nn.Module):
    """Mistral 3's multimodal projector: RMSNorm -> patch merger -> linear_1 -> act -> linear_2."""

    def __init__(self, config: VLMConfig) -> None:
        super().__init__()
        v, t = config.vision.hidden_size, config.text.hidden_size
        bias = config.multimodal_projector_bias
        self.norm = RMSNorm(v, config.text.rms_norm_eps)
        self.patch_merger = PatchMerger(v, config.spatial_merge_size)
        self.linear_1 = nn.Linear(v, t, bias=bias)
        self.linear_2 = nn.Linear(t, t, bias=bias)
        self.act = ACT[config.projector_hidden_act]

    def forward(self, features: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        return self.mlp(self.patch_merger(self.norm(features), grids))

    def mlp(self, merged: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(merged)))

    def forward_batch(self, features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """[B, rows x cols, d] (B images of one size, their patch grid) -> [B, cells, text hidden]."""
        return self.mlp(self.patch_merger.forward_batch(self.norm(features), rows, cols))


class VisionEncoder(nn.Module):
    """Tower + projector: pixel tensors -> one text-width row per merged cell of each image."""

    def __init__(self, config: VLMConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision)
        self.multi_modal_projector = Projector(config)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """images [3, H, W] (H, W multiples of patch x merge), batched under a block-diagonal mask. Returns one
        [cells, text hidden] tensor per image, its cells in raster order (row by row)."""
        p = self.config.vision.patch_size
        grids = [(img.shape[-2] // p, img.shape[-1] // p) for img in images]
        features = self.vision_tower(images, self.config.vision_feature_layer)
        rows = self.multi_modal_projector(features, grids)
        m = self.config.spatial_merge_size
        return list(rows.split([(r // m) * (c // m) for r, c in grids]))

    def forward_batch(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] of one size -> [B, cells, text hidden]: `forward` of each image, as one batch
        (no block-diagonal mask: what training runs)."""
        p = self.config.vision.patch_size
        features = self.vision_tower.forward_batch(images, self.config.vision_feature_layer)
        return self.multi_modal_projector.forward_batch(features, images.shape[-2] // p, images.shape[-1] // p)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.patch_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.patch_conv.weight.device


def build_vision_encoder(config: VLMConfig, tensors: dict[str, torch.Tensor], device, dtype) -> VisionEncoder:
    """The encoder with a checkpoint's tensors (release names, `encoder.` prefix), built without a random init."""
    with torch.device("meta"):
        encoder = VisionEncoder(config)
    state = {k.removeprefix("encoder."): v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder.eval()
