"""Engine build on a machine without TensorRT: the exported graph runs under ONNX Runtime through the same
decoding loops and gives the PyTorch executor's tokens; the build stops with a clear message."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from nld_trt import NLDError, load
from nld_trt.engine.build import BuildOptions, build
from nld_trt.engine.onnx_graph import export_graph
from nld_trt.executors import Chunk, TorchExecutor
from nld_trt.executors.base import PassBatch, PassRow
from nld_trt.executors.onnx_executor import OnnxExecutor
from paged import Pager


@pytest.fixture(scope="module")
def engine(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "float32"
    messages = []
    report = build(BuildOptions(checkpoint=tiny_dir, output=out, dtype="float32", verify_tokens=12,
                                max_batch=4, max_seq_len=512), progress=messages.append)
    return out, report, messages


def test_build_without_tensorrt_ends_with_a_verified_graph_and_says_what_to_run(engine):
    out, report, messages = engine
    assert report.plan is None and "TensorRT is not installed here" in messages[-1]
    assert all(v["identical"] == v["prompts"] == 3 for v in report.verification.values())
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    saved = json.loads((out / "engine.json").read_text())
    assert saved["custom_nodes"] == ["nld::block_attention", "nld::dlm_select", "nld::spec_accept", "nld::write_kv"]
    assert saved["has_lora"] is True and saved["limits"]["page_size"] == 16
    assert saved["limits"]["kv_cache_tokens"] == 4 * 512
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    attention = [n for n in graph.graph.node if n.op_type == "block_attention"]
    writes = [n for n in graph.graph.node if n.op_type == "write_kv"]
    assert len(attention) == len(writes) == 2  # one each per layer
    attrs = {a.name: a for a in attention[0].attribute}
    assert attrs["plugin_namespace"].s == b"nld"  # how TensorRT's parser finds nld::block_attention
    # the write's outputs are the caches the attention reads, and the graph's present_* (aliased in TensorRT)
    assert list(writes[0].output) == ["present_key_0", "present_value_0"] == list(attention[0].input[1:3])
    assert list(writes[0].input[2:5]) == ["past_key_0", "past_value_0", "page_table"]
    assert not any(n.op_type == "ScatterND" for n in graph.graph.node)  # no whole-cache scatter copy
    cache = graph.graph.input[-1].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in cache] == ["cache_pages", 16, 2, 16]
    assert (out / "model.onnx.data").stat().st_size > 100_000  # weights as external data
    assert {p.name for p in out.iterdir()} >= {"config.json", "tokenizer.json", "chat_template.jinja"}


@pytest.mark.parametrize("mode", ["ar", "dlm", "linear_spec"])
def test_engine_directory_generates_the_checkpoint_tokens(engine, tiny, mode):
    out, _, _ = engine
    nld = load(out, max_batch=4, max_seq_len=512)
    assert isinstance(nld.executor, OnnxExecutor) and nld.model is None
    prompts = ["Tom has 12 apples.", "A pack holds 6 pens", [1, 70, 71, 72, 73, 74]]
    kw = dict(mode=mode, max_new_tokens=16, block_length=4)
    assert [r.token_ids for r in nld.generate(prompts, **kw)] == [r.token_ids for r in tiny.generate(prompts, **kw)]


@pytest.mark.parametrize("mode", ["ar", "dlm", "linear_spec", "auto"])
def test_the_sampling_controls_give_the_same_generations_on_onnx_runtime(engine, tiny, mode):
    """Filters, seeds, stop strings, stop tokens, min_tokens and logprobs are in the decoding loops, so an
    engine build gives what the PyTorch executor gives."""
    out, _, _ = engine
    nld = load(out, max_batch=4, max_seq_len=512)
    prompts = ["Tom has 12 apples.", "A pack holds 6 pens"]
    free = tiny.generate(prompts[0], mode=mode, max_new_tokens=24, block_length=4)
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 2]
    for kw in (dict(stop=[stop], min_tokens=3, logprobs=True, top_logprobs=2),
               dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=11, stop_token_ids=[free.token_ids[5]])):
        want = tiny.generate(prompts, mode=mode, max_new_tokens=24, block_length=4, **kw)
        got = nld.generate(prompts, mode=mode, max_new_tokens=24, block_length=4, **kw)
        assert [(g.token_ids, g.text, g.finish_reason) for g in got] == [(w.token_ids, w.text, w.finish_reason) for w in want]
        if kw.get("logprobs"):
            assert [lp.logprob for lp in got[0].logprobs] == pytest.approx([lp.logprob for lp in want[0].logprobs], abs=1e-4)


@pytest.mark.parametrize("mode", ["ar", "dlm", "linear_spec", "auto"])
def test_onnx_runtime_with_prefix_reuse_gives_the_plain_tokens(engine, tiny_dir, mode):
    """The engine graph on ONNX Runtime, prefix cache on (multi-turn: earlier answers reused, a prompt on a page
    boundary, a fully cached one), against the PyTorch executor's plain path (cache off)."""
    from nld_trt.decoding.auto import AR, AutoPlanner
    from nld_trt.executors.cost import CostModel
    from test_prefix_cache_models import same_or_near_tie

    out, _, _ = engine
    hot = load(out, max_batch=4, max_seq_len=512)
    cold = load(tiny_dir, max_batch=4, max_seq_len=512, prefix_cache=False)
    forced = [AR, ("linear_spec", 4), AR]
    for nld in (hot, cold):  # auto's choice scripted by each request's progress (the chooser is tested elsewhere)
        nld._planner = AutoPlanner(cost=CostModel(1e-3, 1, 0.0, 0.0),
                                   force=lambda seq, n: forced[len(seq.out) % len(forced)])
    prompts = [[1] + list(range(140, 171)), [1, 70, 71, 72, 73, 74]]  # 32 tokens: two full pages
    kw = dict(mode=mode, max_new_tokens=16, block_length=4, eos_token_ids=(), logprobs=True, top_logprobs=2)
    reused = 0
    for turn in range(2):
        a, b = hot.generate(prompts + prompts[:1], **kw), cold.generate(prompts + prompts[:1], **kw)
        same_or_near_tie(a, b)
        reused += sum(r.stats.cached_tokens for r in a)
        prompts = [p + r.token_ids + [9, 10, 11] for p, r in zip(prompts, a)]
    assert reused >= 16 + 32 and hot.pages.in_use == 0


def test_onnx_runtime_logits_match_pytorch_for_mixed_rows(tiny, engine):
    out, _, _ = engine
    ort_ex = OnnxExecutor(out / "model.onnx", tiny.config, max_batch=3, max_seq_len=128, has_lora=True)
    torch_ex = TorchExecutor(tiny.model, max_batch=3, max_seq_len=128)
    tables = [[7, 2], [0], [5, 1, 8, 3, 4, 6]]  # pages in no order; 79 tokens span five of them
    prefill = [Chunk([1, 5, 6, 7, 8]), Chunk([1, 9]), Chunk(list(range(1, 80)))]  # 79 tokens: query scale > 1
    step = [Chunk([3, 100, 100, 100], block=True, lora=True), Chunk([4, 5, 6, 7]), Chunk([9, 100, 100, 100], block=True)]
    got = []
    for ex in (ort_ex, torch_ex):
        ex.forward(PassBatch([PassRow(c, 0, t) for c, t in zip(prefill, tables)], all_logits=False))
        rows = [PassRow(step[0], 79, tables[2]), PassRow(step[1], 5, tables[0]), PassRow(step[2], 2, tables[1])]
        got.append(ex.forward(PassBatch(rows)))
    a, b = got
    assert (a - b).abs().max().item() < 1e-4 and b.std().item() > 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_graphs_are_valid_and_shaped_like_the_verified_one(tiny, dtype):
    half = export_graph(tiny.model, dtype)
    onnx.checker.check_model(half, full_check=True)
    full = export_graph(tiny.model, torch.float32)
    ops = lambda m: sorted(n.op_type for n in m.graph.node if n.op_type != "Cast")  # noqa: E731
    assert ops(half) == ops(full)
    weights = {i.name: i.data_type for i in half.graph.initializer}
    assert weights["encoder.layers.0.self_attn.q_proj.weight"] == (
        onnx.TensorProto.BFLOAT16 if dtype == torch.bfloat16 else onnx.TensorProto.FLOAT16)


def test_failed_build_leaves_nothing_behind(tiny_dir, tmp_path, monkeypatch):
    import nld_trt.engine.build as b

    def broken(*args, **kwargs):
        raise NLDError("ONNX Runtime and PyTorch disagree")

    monkeypatch.setattr(b, "verify_graph", broken)
    out = tmp_path / "engine"
    with pytest.raises(NLDError, match="disagree"):
        build(BuildOptions(checkpoint=tiny_dir, output=out, dtype="float32"), progress=lambda m: None)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cpu_refuses_a_half_precision_build_with_a_clear_message(tiny_dir, tmp_path):
    out = tmp_path / "bf16"
    build(BuildOptions(checkpoint=tiny_dir, output=out, dtype="bf16", verify=False), progress=lambda m: None)
    with pytest.raises(NLDError, match="float32 build"):
        load(out)


def test_a_tensorrt_plan_refuses_a_kv_pool_size_it_cannot_apply(tiny, engine, tmp_path):
    """A plan's page pool is fixed at build: a --kv-cache-tokens / --kv-cache-gb at load is an error naming it,
    not silently dropped. (The check comes before TensorRT is needed; the report is the build's own, with a plan.)"""
    from nld_trt.engine.loader import open_engine

    report = json.loads((engine[0] / "engine.json").read_text())
    built = tmp_path / "with-plan"
    built.mkdir()
    (built / "engine.json").write_text(json.dumps({**report, "plan": "nld.plan"}))
    for kv in ({"kv_cache_tokens": 4096}, {"kv_cache_gb": 1.0}):
        name = "--" + next(iter(kv)).replace("_", "-")
        with pytest.raises(NLDError, match=f"fixed its KV pool at build .* so {name} .*rebuild"):
            open_engine(built, tiny.config, "cuda", 4, 256, 32, **kv)


def test_tensorrt_profiles_cover_decode_and_prefill_chunks(tiny):
    from nld_trt.engine.trt_build import profile_shapes

    opts = BuildOptions(checkpoint=None, output=None, max_batch=4, max_seq_len=256, max_block=32)
    decode, prefill = profile_shapes(opts, tiny.config)
    assert decode["input_ids"] == ((1, 1), (4, 32), (4, 32)) and decode["logit_positions"][2] == (4, 32)
    assert prefill["input_ids"][2] == (4, 256) and prefill["logit_positions"][2] == (4, 1)
    assert decode["past_key_0"][0] == (65, 16, 2, 16)  # 4 x 256 positions in 64 pages of 16 + the scratch page
    assert decode["page_table"] == ((1, 16), (4, 16), (4, 16)) == prefill["page_table"]  # 256 positions / 16
    bigger = BuildOptions(checkpoint=None, output=None, max_batch=4, max_seq_len=256, page_size=32,
                          kv_cache_tokens=4096)
    assert profile_shapes(bigger, tiny.config)[0]["past_key_0"][0] == (129, 32, 2, 16)


def test_on_gpu_selection_outputs_equal_the_reference_rules(tiny, engine):
    """The graph's nld::spec_accept and nld::dlm_select outputs, run under ONNX Runtime, equal what the
    decoding loops compute from the logits."""
    import numpy as np
    import onnxruntime as ort

    from nld_trt.decoding.select import accept_greedy, candidates, dlm_fill
    from nld_trt.engine.custom_ops import for_onnxruntime, register

    out, _, _ = engine
    options = ort.SessionOptions()
    options.register_custom_ops_library(register())
    session = ort.InferenceSession(for_onnxruntime(onnx.load(str(out / "model.onnx"))).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    cfg, mask = tiny.config, tiny.config.mask_token_id
    chunks = np.array([[5, 9, 9, 9, 9, 9], [7, mask, mask, 12, mask, mask]], np.int32)
    cache = np.zeros((3, 16, cfg.num_key_value_heads, cfg.head_dim), np.float32)
    feeds = {"input_ids": chunks, "page_table": np.array([[0], [1]], np.int32), "committed": np.zeros(2, np.int32),
             "chunk_lens": np.full(2, 6, np.int32), "block": np.array([0, 1], np.int32), "lora": np.zeros(2, np.int32),
             "logit_positions": np.tile(np.arange(6, dtype=np.int32), (2, 1))}
    feeds.update({f"past_{kv}_{i}": cache for i in range(cfg.num_hidden_layers) for kv in ("key", "value")})
    names = ["logits", "accept_count", "accept_next", "select_tokens", "select_confidence", "select_fill"]
    logits, count, nxt, tokens, conf, fill = session.run(names, feeds)
    for b in range(2):
        lg = torch.from_numpy(logits[b])
        verify, confidence = candidates(lg)
        n = accept_greedy(torch.from_numpy(chunks[b]).long(), verify)
        assert count[b] == n + 1 and nxt[b] == verify[n]
        assert tokens[b].tolist() == verify.tolist() and np.allclose(conf[b], confidence.numpy(), atol=1e-6)
        masked = torch.from_numpy(chunks[b] == mask)
        assert fill[b].astype(bool).tolist() == dlm_fill(masked, confidence, 0.9).tolist()
    assert fill[1].sum() >= 1 and fill[0].sum() == 0  # the block row fills a masked position, the causal row none


# quantized checkpoints -------------------------------------------------------------------------------
INT4_SHAPES = dict(hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
QUICK_CALIBRATION = ["--calib-size", "6", "--calib-seq-len", "48", "--block-length", "8", "--eval-size", "2",
                     "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """FP8 and INT4 AWQ exports (ModelOpt) of one tiny model whose linear widths fit INT4 groups."""
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")
    from click.testing import CliRunner

    from nld_trt.quant.cli import quantize_command
    from nld_trt.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("quantized")
    source = make_tiny_checkpoint(root / "src", seed=3, std=0.08, **INT4_SHAPES)
    out = {}
    for qformat in ("fp8", "int4_awq"):
        out[qformat] = root / qformat
        result = CliRunner().invoke(quantize_command, ["--model", str(source), "--qformat", qformat, "--output",
                                                       str(out[qformat]), *QUICK_CALIBRATION])
        assert result.exit_code == 0, result.output
    return out


@pytest.mark.filterwarnings("ignore::UserWarning:modelopt")
@pytest.mark.parametrize("qformat, algo, dequant_type", [("fp8", "FP8", onnx.TensorProto.FLOAT8E4M3FN),
                                                         ("int4_awq", "W4A16_AWQ", onnx.TensorProto.INT4)])
def test_quantized_checkpoints_export_dequantize_linear_and_verify_in_every_mode(quantized, tmp_path, qformat, algo,
                                                                                 dequant_type):
    out = tmp_path / "engine"
    report = build(BuildOptions(checkpoint=quantized[qformat], output=out, dtype="float32", verify_tokens=10,
                                max_batch=2, max_seq_len=256), progress=lambda _: None)
    assert report.quantization == algo
    assert all(v["identical"] == v["prompts"] == 3 for v in report.verification.values())
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    quantized_weights = {i.name for i in graph.graph.initializer
                         if i.data_type == dequant_type and i.name.endswith(".weight")}
    assert len(quantized_weights) == 7 * 2  # every linear of both layers
    dequantized = {n.input[0] for n in graph.graph.node if n.op_type == "DequantizeLinear"}
    assert quantized_weights <= dequantized
    if qformat == "int4_awq":
        blocked = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in quantized_weights]
        assert all({a.name: a.i for a in n.attribute}["block_size"] == 128 for n in blocked)
    # the engine directory runs the decoding loops through ONNX Runtime; a pass gives the quantized model's logits
    engine_nld = load(out, max_batch=2, max_seq_len=256)
    reference = load(quantized[qformat], max_batch=2, max_seq_len=256)
    prompt = reference.encode("Tom has 12 apples.")
    logits = []
    for ex in (engine_nld.executor, reference.executor):
        pager = Pager(ex)
        table = pager.allocate()
        logits.append(pager.forward([table], [Chunk(prompt)], all_logits=True))
        pager.release(table)
    assert (logits[0] - logits[1]).abs().max().item() < 1e-4 and logits[1].std().item() > 0.1
    if qformat == "int4_awq":  # weight-only: no activation rounding to flip, so greedy tokens agree beyond the
        kw = dict(mode="linear_spec", max_new_tokens=12, block_length=8)  # verified prompts too
        prompts = ["Tom has 12 apples.", [1, 140, 141, 142]]
        assert ([r.token_ids for r in engine_nld.generate(prompts, **kw)]
                == [r.token_ids for r in reference.generate(prompts, **kw)])
