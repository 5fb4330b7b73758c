"""The FP8 KV cache belongs to the cache's layout: K/V are quantized when they are written, in the reference
path, the Triton kernels and the engine graph alike, and all three compute what the checkpoint was
calibrated for (ModelOpt's fake quantization of K after RoPE and of V).

Before pages, the quantization was a hook on the reference attention only: the kernel path (CUDA) never
called it and the engine graph baked k_scale = 1.0 into an unquantized cache, so both ran the model with a
full-precision cache. The kernel and graph tests below compare against the fake-quantized model and check
that an unquantized cache is far from it, so they fail on that code."""

from __future__ import annotations

import onnx
import pytest
import torch

import nld_trt
from nld_trt.decoding import SEQUENCE_TYPES, GenerationParams, run
from nld_trt.engine.build import BuildOptions, build
from nld_trt.engine.onnx_graph import export_graph
from nld_trt.executors import Chunk, TorchExecutor
from nld_trt.plugins.interpret import use_interpreter
from paged import Pager
from test_quant_errors import INT4_SHAPES, fp8_checkpoint
from nld_trt.tiny import make_tiny_checkpoint

TOL = 1e-4
PROMPT = [1] + list(range(140, 170))  # 31 tokens: two pages of 16


@pytest.fixture(scope="module")
def fp8_kv(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8kv")
    src = make_tiny_checkpoint(root / "src", seed=1, std=0.1, **INT4_SHAPES)
    out, _ = fp8_checkpoint(src, root / "fp8kv")
    return out


def cache_free_logits(model, tokens: list[int]) -> torch.Tensor:
    """The calibrated model: one causal cache-free pass, K/V fake-quantized by the checkpoint's kv_quant hook."""
    t = len(tokens)
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        return model.logits(model(torch.tensor([tokens]), torch.arange(t)[None], mask))[0].float()


def incremental_logits(executor, tokens: list[int], prefill: int) -> torch.Tensor:
    """A prefill of `prefill` tokens, then one token per pass: the logits of every position."""
    pager = Pager(executor)
    table = pager.allocate()
    out = [pager.forward([table], [Chunk(tokens[:prefill])])[0]]
    pager.commit(table, prefill)
    for tok in tokens[prefill:]:
        out.append(pager.forward([table], [Chunk([tok])])[0])
        pager.commit(table, 1)
    pager.release(table)
    return torch.cat(out).float()


def unquantized_executor(model, **kw) -> TorchExecutor:
    """The same weights with a full-precision cache (what the kernel path and the graph ran before)."""
    saved = [layer.self_attn.kv_quant for layer in model.encoder.layers]
    for layer in model.encoder.layers:
        layer.self_attn.kv_quant = None
    try:
        return TorchExecutor(model, **kw)
    finally:
        for layer, q in zip(model.encoder.layers, saved):
            layer.self_attn.kv_quant = q


def test_the_reference_cache_is_fp8_and_computes_the_calibrated_model(fp8_kv):
    nld = nld_trt.load(fp8_kv, max_batch=2, max_seq_len=128)
    layout = nld.executor.layout
    assert layout.dtype == torch.float8_e4m3fn and layout.quantized and nld.executor.cache.k[0].element_size() == 1
    assert layout.scales[0].k_dequant == pytest.approx(0.01)
    want = cache_free_logits(nld.model, PROMPT)
    got = incremental_logits(nld.executor, PROMPT, 10)
    assert (got - want).abs().max() <= TOL
    plain = incremental_logits(unquantized_executor(nld.model, max_batch=2, max_seq_len=128), PROMPT, 10)
    assert (plain - want).abs().max() > 100 * TOL  # the quantization is visible: the check has teeth


def test_the_kernel_path_quantizes_like_the_reference(fp8_kv):
    use_interpreter()
    nld = nld_trt.load(fp8_kv, max_batch=2, max_seq_len=64)
    kernels = TorchExecutor(nld.model, max_batch=2, max_seq_len=64, kernels=True)
    assert kernels.layout == nld.executor.layout
    prompt = PROMPT[:12]
    want = cache_free_logits(nld.model, prompt)
    got = incremental_logits(kernels, prompt, 6)
    assert (got - want).abs().max() <= TOL
    params = GenerationParams(mode="linear_spec", max_new_tokens=8, block_length=4,
                              eos_token_ids=()).resolved(nld.config)
    outs = []
    for ex in (nld.executor, kernels):
        outs.append([s.out for s in run(ex, [SEQUENCE_TYPES["linear_spec"](p, params, nld.config, 0)
                                             for p in (prompt, PROMPT[3:14])])])
    assert outs[0] == outs[1]


def test_the_engine_graph_quantizes_like_the_reference(fp8_kv, tmp_path):
    out = tmp_path / "engine"
    report = build(BuildOptions(checkpoint=fp8_kv, output=out, dtype="float32", verify_tokens=10, max_batch=2,
                                max_seq_len=128), progress=lambda _: None)
    assert all(v["identical"] == v["prompts"] == 3 for v in report.verification.values())
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    write = next(n for n in graph.graph.node if n.op_type == "write_kv")
    attention = next(n for n in graph.graph.node if n.op_type == "block_attention")
    w = {a.name: (a.i if a.type == onnx.AttributeProto.INT else a.f) for a in write.attribute if a.name != "plugin_namespace"}
    a = {a.name: a.f for a in attention.attribute if a.name in ("k_scale", "v_scale")}
    assert w["quantize"] == 1 and w["k_quant"] == pytest.approx(100.0) and a["k_scale"] == pytest.approx(0.01)
    engine = nld_trt.load(out, max_batch=2, max_seq_len=128)
    reference = nld_trt.load(fp8_kv, max_batch=2, max_seq_len=128)
    want = cache_free_logits(reference.model, PROMPT)
    got = incremental_logits(engine.executor, PROMPT, 10)
    assert (got - want).abs().max() <= TOL


def test_a_16_bit_graph_takes_an_fp8_cache(fp8_kv):
    model = nld_trt.load(fp8_kv, max_batch=1, max_seq_len=64).model
    graph = export_graph(model, torch.bfloat16)
    onnx.checker.check_model(graph, full_check=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.graph.input, *graph.graph.output]}
    assert types["past_key_0"] == types["present_value_1"] == onnx.TensorProto.FLOAT8E4M3FN
    assert export_graph(model, torch.float32).graph.input[-1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
