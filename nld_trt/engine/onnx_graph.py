"""The NLD forward pass as an ONNX graph for TensorRT, op for op the computation of `nld_trt.model`.

The graph is written node by node (as model builders for ONNX LLM runtimes do) rather than traced: the paged
KV cache, page tables, per-sequence lengths and attention pattern are explicit inputs; per layer, the KV
write and the attention are custom nodes carrying the TensorRT plugins' names (`nld::write_kv`,
`nld::block_attention`); quantized weights are standard `DequantizeLinear` nodes so that TensorRT picks its
own FP8 and INT4 kernels. One function per concern, as nld_trt/model.py is split: inputs, rotary tables,
a decoder layer (its attention with the cache write, its MLP), the head and the on-GPU selections.

Inputs (B rows, T chunk positions, L logit positions, N pages + 1 scratch page of P positions, W pages per
table):
  input_ids [B, T] int32, page_table [B, W] int32 (row b's position p is at offset p % P of page
  page_table[b, p // P]), committed / chunk_lens [B] int32, block / lora [B] int32 (0 or 1),
  logit_positions [B, L] int32 (chunk positions whose logits are returned),
  image_rows [R, hidden] (a vision-language model's graph only; the graph's dtype): embedding rows for image
  positions, TensorRT-LLM's prompt-table convention: an input id v >= vocab_size stands for row
  v - vocab_size of this table (an image's projector rows at its `<|image_pad|>` positions, rows of every
  chunk of the pass in one table). A pass without images feeds one zero row (R >= 1, as TensorRT-LLM feeds
  a one-row table when there is no prompt table), so the profiles need no empty tensor and the graph no branch;
  a text-only pass pays one gather from that row and a select, the size of the token-embedding gather.
  past_key_{i} / past_value_{i} [N + 1, P, Hkv, D] for every layer i (FP8 for a quantized layout in a 16-bit
  graph; a float32 graph holds the same e4m3 values in float32, as ONNX Runtime runs it).
Outputs: logits [B, L, V] float32, present_key_{i} / present_value_{i}: the caches with the chunk's K/V
written at committed..committed+n-1 of each row's pages. `nld::write_kv` declares them aliased to the past_*
inputs, so TensorRT writes in place and the executor binds past_* and present_* to one buffer (no copy);
ONNX Runtime, whose custom operators return new arrays, hands back updated copies. Then the on-GPU
selections of the returned positions, so that full logits need not leave the GPU: accept_count /
accept_next [B] (`nld::spec_accept`, for a verify pass: n + 1 and the verifier's next token) and
select_tokens / select_confidence / select_fill [B, L] (`nld::dlm_select`: argmax, its softmax probability,
and the dlm fill rule at threshold 0.9 over the positions holding the mask token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..config import NLDConfig
from ..executors.graph_io import IMAGE_ROWS
from ..kv.layout import DEFAULT_PAGE_SIZE, KVScales
from ..model import NLDModel
from ..quant.kv import kv_scales

OPSET = 21
PLUGIN_DOMAIN = "nld"
ATTENTION_OP = "block_attention"  # TensorRT plugin nld::block_attention (see plugins/block_attention/trt.py)
WRITE_OP = "write_kv"  # nld::write_kv: the chunk's K/V into the pages, in place (aliased outputs)
ACCEPT_OP = "spec_accept"  # nld::spec_accept: greedy acceptance of a verify pass, on the GPU
SELECT_OP = "dlm_select"  # nld::dlm_select: candidates, confidences and dlm fill flags of a block pass
SELECT_THRESHOLD = 0.9  # dlm_select's fill threshold is baked into its PTX (the dlm default)

ONNX_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}


@dataclass(frozen=True)
class LinearWeights:
    """One linear layer as the graph stores it. kind "float": weight [out, in]; "fp8": weight e4m3 with a
    per-tensor weight_scale and input_scale (W8A8); "int4": integer weight in [-8, 7] with per-group scales
    [out, in / group] and an optional AWQ pre_quant_scale [in] (weight-only)."""

    kind: str
    weight: torch.Tensor
    weight_scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    group_size: int | None = None
    pre_quant_scale: torch.Tensor | None = None


def linear_weights(module: torch.nn.Module) -> LinearWeights:
    """How a model's linear module is stored in the graph (quantized modules describe themselves)."""
    describe = getattr(module, "onnx_weights", None)
    if describe is not None:
        return describe()
    return LinearWeights("float", module.weight.detach())


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


class Graph:
    """A tiny helper to write nodes, constants and initializers with unique names."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.dtype = dtype
        self.onnx_dtype = ONNX_DTYPES[dtype]
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1, domain: str = "",
           **attrs) -> str | list[str]:
        outs = [self.name(hint or op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(f"n_{op_type}"), domain=domain,
                                           **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, name: str, array: np.ndarray | torch.Tensor) -> str:
        if isinstance(array, torch.Tensor):
            if array.dtype == torch.bfloat16:
                proto = helper.make_tensor(name, TensorProto.BFLOAT16, list(array.shape),
                                           array.contiguous().view(torch.int16).numpy().tobytes(), raw=True)
                self.initializers.append(proto)
                return name
            if array.dtype == torch.float8_e4m3fn:
                proto = helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(array.shape),
                                           array.contiguous().view(torch.uint8).numpy().tobytes(), raw=True)
                self.initializers.append(proto)
                return name
            array = to_numpy(array)
        self.initializers.append(numpy_helper.from_array(np.require(array, requirements="C"), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        return self.init(self.name("const"), np.asarray(values, dtype=dtype))

    def weight(self, name: str, t: torch.Tensor) -> str:
        return self.init(name, t.to(self.dtype))

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", [x], to=to)


def rms_norm(g: Graph, x: str, weight: torch.Tensor, eps: float, name: str) -> str:
    """RMSNorm in float32 (as the model does), result in the graph dtype times the weight."""
    x32 = g.cast(x, TensorProto.FLOAT)
    var = g.op("ReduceMean", [g.op("Mul", [x32, x32]), g.const([-1])], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const(eps, np.float32)])])])
    normed = g.cast(g.op("Mul", [x32, inv]), g.onnx_dtype)
    return g.op("Mul", [normed, g.weight(name, weight)])


def linear(g: Graph, x: str, lw: LinearWeights, name: str) -> str:
    """x [..., in] @ W^T, with W stored transposed [in, out] (so DequantizeLinear feeds MatMul directly)."""
    if lw.kind == "float":
        return g.op("MatMul", [x, g.weight(name, lw.weight.t())])
    if lw.kind == "fp8":
        w = g.init(name, lw.weight.t().contiguous())
        w_scale = g.init(name + ".weight_scale", lw.weight_scale.float().reshape(()).to(g.dtype))
        x_scale = g.init(name + ".input_scale", lw.input_scale.float().reshape(()).to(g.dtype))
        zero = g.init(name + ".input_zero", torch.zeros((), dtype=torch.float8_e4m3fn))
        xq = g.op("QuantizeLinear", [x, x_scale, zero])
        xd = g.op("DequantizeLinear", [xq, x_scale])
        wd = g.op("DequantizeLinear", [w, w_scale])
        return g.op("MatMul", [xd, wd])
    if lw.kind == "int4":
        q = lw.weight.t().contiguous().to(torch.int8).numpy()  # [in, out], values in [-8, 7]
        packed = helper.make_tensor(name, TensorProto.INT4, list(q.shape), q.flatten().tolist())
        g.initializers.append(packed)
        scales = g.init(name + ".weight_scale", lw.weight_scale.t().contiguous().to(g.dtype))  # [in / group, out]
        wd = g.op("DequantizeLinear", [name, scales], axis=0, block_size=lw.group_size)
        if lw.pre_quant_scale is not None:
            x = g.op("Mul", [x, g.weight(name + ".pre_quant_scale", lw.pre_quant_scale)])
        return g.op("MatMul", [x, wd])
    raise ValueError(f"unknown linear kind {lw.kind!r}")


def rotate_half(g: Graph, x: str, head_dim: int) -> str:
    half = head_dim // 2
    x1, x2 = g.op("Split", [x, g.const([half, half])], axis=-1, n_out=2)
    return g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)


@dataclass(frozen=True)
class CacheSpec:
    """The engine's view of the KV layout: page size, element type and (a quantized layout) per-layer scales."""

    page_size: int
    onnx_type: int
    scales: tuple[KVScales, ...] | None

    @classmethod
    def of(cls, model: NLDModel, g: Graph, page_size: int) -> CacheSpec:
        scales = kv_scales(model)
        fp8 = scales is not None and g.dtype != torch.float32  # float32 graphs (ONNX Runtime) hold e4m3 values
        return cls(page_size, TensorProto.FLOAT8E4M3FN if fp8 else g.onnx_dtype, scales)


@dataclass(frozen=True)
class Rope:
    cos: str  # [B, 1, T, D]
    sin: str
    qscale: str  # [B, 1, T, 1]


def graph_inputs(g: Graph, config: NLDConfig, cache: CacheSpec) -> list[onnx.ValueInfoProto]:
    i32 = TensorProto.INT32
    inputs = [
        helper.make_tensor_value_info("input_ids", i32, ["batch", "chunk"]),
        helper.make_tensor_value_info("page_table", i32, ["batch", "table_width"]),
        helper.make_tensor_value_info("committed", i32, ["batch"]),
        helper.make_tensor_value_info("chunk_lens", i32, ["batch"]),
        helper.make_tensor_value_info("block", i32, ["batch"]),
        helper.make_tensor_value_info("lora", i32, ["batch"]),
        helper.make_tensor_value_info("logit_positions", i32, ["batch", "n_logits"]),
    ]
    if config.is_vlm:  # before the caches: the executors read the cache type from the last input
        inputs.append(helper.make_tensor_value_info(IMAGE_ROWS, g.onnx_dtype, ["image_rows", config.hidden_size]))
    for i in range(config.num_hidden_layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kv}_{i}", cache.onnx_type, cache_dims(config, cache)))
    return inputs


def cache_dims(config: NLDConfig, cache: CacheSpec) -> list:
    return ["cache_pages", cache.page_size, config.num_key_value_heads, config.head_dim]


def embeddings(g: Graph, model: NLDModel) -> str:
    """[B, T, hidden]: the token embeddings of input_ids; in a VLM's graph an id v >= vocab_size takes row
    v - vocab_size of `image_rows` instead (gathered at index 0 elsewhere, then selected away)."""
    table = g.weight("encoder.embed_tokens.weight", model.encoder.embed_tokens.weight)
    if not model.config.is_vlm:
        return g.op("Gather", [table, "input_ids"], axis=0)
    vocab, zero = g.const(model.config.vocab_size, np.int32), g.const(0, np.int32)
    is_row = g.op("GreaterOrEqual", ["input_ids", vocab])  # [B, T]
    tokens = g.op("Gather", [table, g.op("Where", [is_row, zero, "input_ids"])], axis=0)
    rows = g.op("Gather", [IMAGE_ROWS, g.op("Where", [is_row, g.op("Sub", ["input_ids", vocab]), zero])], axis=0)
    return g.op("Where", [g.op("Unsqueeze", [is_row, g.const([2])]), rows, tokens])


def rotary(g: Graph, model: NLDModel) -> Rope:
    """Positions committed + j, the rotary tables and the per-position query scale, in float32 as the model
    computes them."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    t_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)], axis=0)
    j = g.op("Range", [g.const(0), t_len, g.const(1)])  # [T] int64
    positions = g.op("Add", [g.op("Unsqueeze", [g.cast("committed", i64), g.const([1])]),
                             g.op("Unsqueeze", [j, g.const([0])])])
    pos_f = g.cast(positions, f32)  # [B, T]
    inv_freq = g.init("rope.inv_freq", model.rotary.inv_freq.float())
    freqs = g.op("Mul", [g.op("Unsqueeze", [pos_f, g.const([-1])]), inv_freq])
    emb = g.op("Concat", [freqs, freqs], axis=-1)  # [B, T, D]
    att_scale = g.const(float(model.rotary.attention_scaling), np.float32)
    cos = g.cast(g.op("Mul", [g.op("Cos", [emb]), att_scale]), g.onnx_dtype)
    sin = g.cast(g.op("Mul", [g.op("Sin", [emb]), att_scale]), g.onnx_dtype)
    floor = g.op("Floor", [g.op("Div", [pos_f, g.const(float(model.rotary.original_max), np.float32)])])
    qscale = g.op("Add", [g.const(1.0, np.float32),
                          g.op("Mul", [g.const(float(model.rotary.beta), np.float32),
                                       g.op("Log", [g.op("Add", [g.const(1.0, np.float32), floor])])])])
    return Rope(g.op("Unsqueeze", [cos, g.const([1])]), g.op("Unsqueeze", [sin, g.const([1])]),
                g.op("Unsqueeze", [g.cast(qscale, g.onnx_dtype), g.const([1, 3])]))


def attention_block(g: Graph, attn, i: int, h: str, rope: Rope, cache: CacheSpec, lora_rows: str,
                    config: NLDConfig) -> tuple[str, list[str]]:
    """q/k/v, rotary, the KV write into the pages (`nld::write_kv`), the attention (`nld::block_attention`),
    o_proj with the draft adapter on the `lora` rows. Returns the output and the layer's present caches."""
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    p = f"encoder.layers.{i}.self_attn."

    def heads_first(t: str, n: int) -> str:
        return g.op("Transpose", [g.op("Reshape", [t, g.const([0, 0, n, d])])], perm=[0, 2, 1, 3])

    q = heads_first(linear(g, h, linear_weights(attn.q_proj), p + "q_proj.weight"), hq)
    k = heads_first(linear(g, h, linear_weights(attn.k_proj), p + "k_proj.weight"), hkv)
    v = heads_first(linear(g, h, linear_weights(attn.v_proj), p + "v_proj.weight"), hkv)
    q = g.op("Add", [g.op("Mul", [q, rope.cos]), g.op("Mul", [rotate_half(g, q, d), rope.sin])])
    q = g.op("Mul", [q, rope.qscale])
    k = g.op("Add", [g.op("Mul", [k, rope.cos]), g.op("Mul", [rotate_half(g, k, d), rope.sin])])
    s = cache.scales[i] if cache.scales is not None else None
    present = [f"present_key_{i}", f"present_value_{i}"]
    g.nodes.append(helper.make_node(
        WRITE_OP, [k, v, f"past_key_{i}", f"past_value_{i}", "page_table", "committed", "chunk_lens"], present,
        name=g.name("write_kv"), domain=PLUGIN_DOMAIN, plugin_namespace="nld",
        k_quant=s.k_quant if s else 1.0, v_quant=s.v_quant if s else 1.0, quantize=int(s is not None)))
    a = g.op(ATTENTION_OP, [q, *present, "page_table", "committed", "chunk_lens", "block"], domain=PLUGIN_DOMAIN,
             scale=float(attn.scale), k_scale=s.k_dequant if s else 1.0, v_scale=s.v_dequant if s else 1.0,
             plugin_namespace="nld")
    a = g.op("Reshape", [g.op("Transpose", [a], perm=[0, 2, 1, 3]), g.const([0, 0, hq * d])])
    o = linear(g, a, linear_weights(attn.o_proj), p + "o_proj.weight")
    if attn.lora is not None:
        lo = attn.lora
        delta = g.op("MatMul", [g.op("MatMul", [a, g.weight(p + "o_proj.lora_A", lo.A.t())]),
                                g.weight(p + "o_proj.lora_B", lo.B.t())])
        scale = g.init(g.name("lora_scale"), torch.tensor(lo.scale, dtype=g.dtype))
        o = g.op("Add", [o, g.op("Mul", [g.op("Mul", [delta, scale]), lora_rows])])
    return o, present


def mlp_block(g: Graph, mlp, i: int, h: str) -> str:
    p = f"encoder.layers.{i}.mlp."
    gate = linear(g, h, linear_weights(mlp.gate_proj), p + "gate_proj.weight")
    up = linear(g, h, linear_weights(mlp.up_proj), p + "up_proj.weight")
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # silu(gate) * up
    return linear(g, act, linear_weights(mlp.down_proj), p + "down_proj.weight")


def head(g: Graph, model: NLDModel, x: str) -> None:
    """The final norm and diffusion_head at the logit positions: `logits` [B, L, V] float32."""
    config = model.config
    x = rms_norm(g, x, model.encoder.norm.weight, config.rms_norm_eps, "encoder.norm.weight")
    pos_idx = g.cast("logit_positions", TensorProto.INT64)
    gather_idx = g.op("Expand", [g.op("Unsqueeze", [pos_idx, g.const([2])]),
                                 g.op("Concat", [g.op("Shape", [pos_idx]), g.const([config.hidden_size])], axis=0)])
    picked = g.op("GatherElements", [x, gather_idx], axis=1)  # [B, L, H]
    logits = linear(g, picked, linear_weights(model.diffusion_head), "diffusion_head.weight")
    g.nodes.append(helper.make_node("Cast", [logits], ["logits"], to=TensorProto.FLOAT, name=g.name("cast_logits")))


def selections(g: Graph, config: NLDConfig) -> None:
    """On-GPU selection over the returned positions (the chunk tokens there are the draft / the block)."""
    i32 = TensorProto.INT32
    # [B, L] int32; image-row ids (>= vocab_size) come only in prefill chunks, and are compared, never indexed
    chunk_at = g.op("GatherElements", ["input_ids", "logit_positions"], axis=1)
    g.nodes.append(helper.make_node(ACCEPT_OP, [chunk_at, "logits"], ["accept_count", "accept_next"],
                                    name=g.name("spec_accept"), domain=PLUGIN_DOMAIN, plugin_namespace="nld"))
    masked = g.cast(g.op("Equal", [chunk_at, g.const(config.mask_token_id, np.int32)]), i32)
    fill_all = g.op("Mul", [g.cast("chunk_lens", i32), g.const(0, np.int32)])  # [B] zeros
    g.nodes.append(helper.make_node(
        SELECT_OP, ["logits", masked, fill_all], ["select_tokens", "select_confidence", "select_fill"],
        name=g.name("dlm_select"), domain=PLUGIN_DOMAIN, threshold=SELECT_THRESHOLD, plugin_namespace="nld"))


def graph_outputs(config: NLDConfig, cache: CacheSpec, presents: list[str]) -> list[onnx.ValueInfoProto]:
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "n_logits", config.vocab_size])]
    outputs += [helper.make_tensor_value_info(n, cache.onnx_type, cache_dims(config, cache)) for n in presents]
    outputs += [helper.make_tensor_value_info(n, i32, ["batch"]) for n in ("accept_count", "accept_next")]
    outputs += [helper.make_tensor_value_info("select_tokens", i32, ["batch", "n_logits"]),
                helper.make_tensor_value_info("select_confidence", f32, ["batch", "n_logits"]),
                helper.make_tensor_value_info("select_fill", i32, ["batch", "n_logits"])]
    return outputs


def export_graph(model: NLDModel, dtype: torch.dtype = torch.float32,
                 page_size: int = DEFAULT_PAGE_SIZE) -> onnx.ModelProto:
    """The ONNX model of one forward pass over a paged cache of `page_size` (see the module docstring)."""
    config: NLDConfig = model.config
    g = Graph(dtype)
    cache = CacheSpec.of(model, g, page_size)
    inputs = graph_inputs(g, config, cache)
    rope = rotary(g, model)
    lora_rows = g.op("Unsqueeze", [g.cast("lora", g.onnx_dtype), g.const([1, 2])])  # [B, 1, 1]
    x = embeddings(g, model)
    presents: list[str] = []
    for i, layer in enumerate(model.encoder.layers):
        p = f"encoder.layers.{i}."
        h = rms_norm(g, x, layer.input_layernorm.weight, config.rms_norm_eps, p + "input_layernorm.weight")
        o, present = attention_block(g, layer.self_attn, i, h, rope, cache, lora_rows, config)
        presents += present
        x = g.op("Add", [x, o])
        h = rms_norm(g, x, layer.post_attention_layernorm.weight, config.rms_norm_eps,
                     p + "post_attention_layernorm.weight")
        x = g.op("Add", [x, mlp_block(g, layer.mlp, i, h)])
    head(g, model, x)
    selections(g, config)
    graph = helper.make_graph(g.nodes, "nld_forward", inputs, graph_outputs(config, cache, presents),
                              initializer=g.initializers)
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(PLUGIN_DOMAIN, 1)],
        producer_name="nld-trt",
    )
    onnx_model.ir_version = 10
    return onnx_model
