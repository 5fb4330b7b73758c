"""The TensorRT-facing code (engine/trt_build.py, executors/trt_executor.py) against a stand-in `tensorrt`.

TensorRT cannot be installed here, so a small fake module takes its place in sys.modules. It implements the
calls that code makes, with TensorRT's names and the checks TensorRT itself applies (profile bounds, every
dynamic input profiled, every I/O tensor bound, no output sharing memory with an input unless a plugin
declares it aliased, which needs the preview feature for aliased plugin I/O), records what it was asked, and
"executes" a plan by running the same ONNX graph under ONNX Runtime on the bound CPU memory. What this cannot
show: that the real TensorRT parses and builds the graph, and the plugins' kernels (GPU checks).
"""

from __future__ import annotations

import ctypes
import enum
import json
import shutil
import sys
import types

import numpy as np
import onnx
import pytest
import torch

from nld_trt import NLDError
from nld_trt.engine.build import BuildOptions
from nld_trt.engine.onnx_graph import export_graph
from nld_trt.engine.trt_build import build_plan, profile_shapes
from nld_trt.executors import Chunk
from nld_trt.executors.base import PassBatch, PassRow
from nld_trt.executors.onnx_executor import OnnxExecutor
from paged import Pager
from nld_trt.executors.trt_executor import INPUTS, TensorRTExecutor, input_feeds

LIMITS = dict(max_batch=2, max_seq_len=64, max_block=8)
ONNX_TO_TRT = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.BFLOAT16: "BF16",
               onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64"}
NUMPY = {"FLOAT": np.float32, "INT32": np.int32, "INT64": np.int64}


# the stand-in -----------------------------------------------------------------------------------------
def fake_tensorrt(version: str = "10.9.0.34") -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []  # (what, details) in call order
    trt.parse_errors = []  # set to make parse_from_file fail with these messages
    trt.serialized = None  # set to make build_serialized_network return this instead of a plan
    trt.runner = None  # set to a function(context) that computes the outputs of execute_async_v3
    trt.NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag",
        {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2, "PREFER_AOT_PYTHON_PLUGINS": 3})
    trt.DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT8 INT32 INT64 BOOL UINT8 FP8")
    trt.TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
    trt.PreviewFeature = enum.Enum("PreviewFeature", "PROFILE_SHARING_0806 ALIASED_PLUGIN_IO_10_03")

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    class Tensor(types.SimpleNamespace):  # ITensor: name, shape (-1 where dynamic), dtype; dims keeps the symbols
        pass

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.outputs = flags, [], []
            self.aliases = {}  # output -> the input a plugin declared it aliased to (nld::write_kv's caches)

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class ParserError:
        def __init__(self, desc):
            self._desc = desc

        def desc(self):
            return self._desc

        def __str__(self):
            return f"In node 7 (importFallbackPluginImporter): UNSUPPORTED_NODE: {self._desc}"

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

        def parse_from_file(self, path):
            trt.calls.append(("parse_from_file", path))
            if trt.parse_errors:
                self.errors = [ParserError(e) for e in trt.parse_errors]
                return False
            graph = onnx.load(path, load_external_data=False).graph
            for node in graph.node:  # the registered nld::write_kv returns its cache inputs 2, 3 aliased
                if node.op_type == "write_kv":
                    self.network.aliases.update({node.output[0]: node.input[2], node.output[1]: node.input[3]})
            for values, into in ((graph.input, self.network.inputs), (graph.output, self.network.outputs)):
                for v in values:
                    t = v.type.tensor_type
                    dims = [d.dim_param or d.dim_value for d in t.shape.dim]
                    into.append(Tensor(name=v.name, dtype=trt.DataType[ONNX_TO_TRT[t.elem_type]], dims=dims,
                                       shape=tuple(d if isinstance(d, int) else -1 for d in dims)))
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):
            self.shapes[name] = tuple(tuple(int(x) for x in s) for s in (min, opt, max))

    class BuilderConfig:
        def __init__(self):
            self.profiles, self.preview = [], set()

        def set_preview_feature(self, feature, enable):
            trt.calls.append(("set_preview_feature", feature.name, enable))
            (self.preview.add if enable else self.preview.discard)(feature)

        def add_optimization_profile(self, profile):
            for lo, opt, hi in profile.shapes.values():  # TensorRT returns -1 for an invalid profile
                if not (len(lo) == len(opt) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, opt, hi))):
                    return -1
            self.profiles.append(profile.shapes)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            trt.calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.calls.append(("build_serialized_network", config.profiles))
            if trt.serialized is not None:
                return trt.serialized
            dynamic = [t.name for t in network.inputs if -1 in t.shape]
            if not config.profiles or any(n not in p for p in config.profiles for n in dynamic):
                return None  # TensorRT logs "no optimization profile for input ..." and returns None
            if network.aliases and trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03 not in config.preview:
                return None  # aliased plugin I/O is a preview feature in TensorRT 10
            io = [(t.name, mode, t.dtype.name, t.dims) for mode, ts in (("INPUT", network.inputs),
                                                                      ("OUTPUT", network.outputs)) for t in ts]
            return json.dumps({"io": io, "profiles": config.profiles, "aliases": network.aliases}).encode()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            try:
                return Engine(json.loads(bytes(data)))
            except ValueError:
                return None

    class Engine:
        def __init__(self, plan):
            self.io = {name: (trt.TensorIOMode[mode], trt.DataType[dtype], dims)
                       for name, mode, dtype, dims in plan["io"]}
            self.names, self.profiles = [n for n, *_ in plan["io"]], plan["profiles"]
            self.aliases = plan["aliases"]

        num_io_tensors = property(lambda self: len(self.names))
        num_optimization_profiles = property(lambda self: len(self.profiles))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return self.io[name][0]

        def get_tensor_dtype(self, name):
            return self.io[name][1]

        def get_tensor_profile_shape(self, name, profile):
            return [tuple(s) for s in self.profiles[profile][name]]

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}

        def set_optimization_profile_async(self, profile, stream):
            trt.calls.append(("set_optimization_profile_async", profile))
            self.profile, self.shapes = profile, {}  # switching invalidates the input shapes
            return 0 <= profile < self.engine.num_optimization_profiles

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
            shape = tuple(int(x) for x in shape)
            if len(shape) != len(lo) or not all(a <= x <= b for a, x, b in zip(lo, shape, hi)):
                return False
            self.shapes[name] = shape
            return True

        def set_tensor_address(self, name, address):
            assert name in self.engine.io, name
            self.addresses[name] = address

        def get_tensor_shape(self, name):
            if name in self.shapes:
                return self.shapes[name]
            sizes = {}
            for n, s in self.shapes.items():
                sizes.update({d: x for d, x in zip(self.engine.io[n][2], s) if isinstance(d, str)})
            return tuple(sizes.get(d, -1) if isinstance(d, str) else d for d in self.engine.io[name][2])

        def execute_async_v3(self, stream_handle):
            inputs = [n for n in self.engine.names if self.engine.io[n][0] == trt.TensorIOMode.INPUT]
            assert set(self.shapes) == set(inputs), "an input shape is not set"
            assert set(self.addresses) == set(self.engine.names), "an I/O tensor has no address"
            outputs = set(self.engine.names) - set(inputs)
            for out, inp in self.engine.aliases.items():  # written in place: bound to its input's memory
                assert self.addresses[out] == self.addresses[inp], f"{out} is aliased to {inp}: bind it there"
            plain = outputs - set(self.engine.aliases)
            assert not {self.addresses[o] for o in plain} & {self.addresses[i] for i in inputs}, "aliased I/O"
            trt.calls.append(("execute_async_v3", dict(self.addresses), dict(self.shapes)))
            if trt.runner is not None:
                trt.runner(self)
            return True

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    return trt


def memory(address: int, shape: tuple, dtype) -> np.ndarray:
    """A numpy view of bound CPU memory (the stand-in's executions read and write through these)."""
    count = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * count).from_address(address), dtype=dtype).reshape(shape)


def onnx_runtime_runner(session):
    """execute_async_v3 of the stand-in: run the plan's graph under ONNX Runtime on the bound memory."""

    def run(context):
        engine = context.engine
        names = [n for n in engine.names if engine.io[n][0].name == "INPUT"]
        feeds = {n: memory(context.addresses[n], context.shapes[n], NUMPY[engine.io[n][1].name]).copy() for n in names}
        outputs = [n for n in engine.names if n not in feeds]
        for name, value in zip(outputs, session.run(outputs, feeds)):
            view = memory(context.addresses[name], context.get_tensor_shape(name), NUMPY[engine.io[name][1].name])
            view[...] = value

    return run


# fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph_dir(tiny, tiny_dir, tmp_path_factory):
    """The float32 graph of the tiny model with its config.json, as a build leaves them."""
    out = tmp_path_factory.mktemp("trt_graph")
    onnx.save(export_graph(tiny.model, torch.float32), str(out / "model.onnx"))
    shutil.copy(tiny_dir / "config.json", out / "config.json")
    return out


@pytest.fixture
def trt(monkeypatch):
    fake = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    import nld_trt.plugins.trt as nld_plugins

    monkeypatch.setattr(nld_plugins, "register_all", lambda: fake.calls.append(("register_all", None)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # build_plan checks for the build GPU
    return fake


def options(graph_dir, **overrides):
    return BuildOptions(checkpoint=None, output=graph_dir, **{**LIMITS, **overrides})


def calls(trt, what):
    return [c[1:] for c in trt.calls if c[0] == what]


# build_plan -------------------------------------------------------------------------------------------
def test_build_plan_profiles_every_graph_input_strongly_typed_after_registering_plugins(trt, graph_dir, tmp_path, tiny):
    plan = tmp_path / "nld.plan"
    messages = []
    build_plan(graph_dir / "model.onnx", plan, options(graph_dir), messages.append)
    order = [c[0] for c in trt.calls]
    assert order.index("register_all") < order.index("parse_from_file") < order.index("build_serialized_network")
    assert calls(trt, "parse_from_file") == [(str(graph_dir / "model.onnx"),)]  # the path: external data is beside it
    (flags,), = calls(trt, "create_network")
    assert flags & (1 << 1) and flags & (1 << 3) and not flags & 1  # STRONGLY_TYPED, PREFER_AOT, no EXPLICIT_BATCH
    assert calls(trt, "set_preview_feature") == [("ALIASED_PLUGIN_IO_10_03", True)]  # in-place KV writes
    (profiles,), = calls(trt, "build_serialized_network")
    assert profiles == profile_shapes(options(graph_dir), tiny.config)
    graph = onnx.load(str(graph_dir / "model.onnx"), load_external_data=False).graph
    assert all(set(p) == {i.name for i in graph.input} for p in profiles)
    b, s, blk = LIMITS["max_batch"], LIMITS["max_seq_len"], LIMITS["max_block"]
    decode, prefill = profiles
    for p in profiles:
        for name, (lo, opt, hi) in p.items():
            assert all(x <= y <= z for x, y, z in zip(lo, opt, hi)), name
            assert lo[0] >= 1 and (hi[0] == b or name.startswith("past_"))
        # the whole page pool, fixed: max_batch x max_seq_len positions in pages of 16, + the scratch page
        assert p["past_key_1"] == ((b * s // 16 + 1, 16, 2, 16),) * 3
        assert p["page_table"] == ((1, s // 16), (b, s // 16), (b, s // 16))
    assert decode["input_ids"][2] == (b, blk) and decode["logit_positions"][2] == (b, blk)
    assert prefill["input_ids"][2] == (b, s) and prefill["logit_positions"][2] == (b, 1)
    written = json.loads(plan.read_bytes())["profiles"]  # the stand-in's plan records what it was built with
    assert written == [{k: [list(x) for x in v] for k, v in p.items()} for p in profiles]
    assert [p.name for p in tmp_path.iterdir()] == ["nld.plan"] and messages


def test_parser_errors_name_the_graph_and_the_node_and_nothing_is_built(trt, graph_dir, tmp_path):
    trt.parse_errors = ["Plugin not found, are the plugin name, version, and namespace correct? (block_attention)"]
    with pytest.raises(NLDError, match=r"could not parse .*model\.onnx: In node 7 .*block_attention"):
        build_plan(graph_dir / "model.onnx", tmp_path / "nld.plan", options(graph_dir), lambda m: None)
    assert not calls(trt, "build_serialized_network") and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("serialized", [None, object()], ids=["build fails", "write fails"])
def test_a_failed_build_or_write_leaves_no_partial_plan(trt, graph_dir, tmp_path, serialized, monkeypatch):
    plan = tmp_path / "nld.plan"
    plan.write_bytes(b"the previous plan")
    if serialized is None:
        monkeypatch.setattr(trt.Builder, "build_serialized_network", lambda self, network, config: None)
    trt.serialized = serialized  # not a buffer: the write fails after the temporary file exists
    with pytest.raises((NLDError, TypeError)):
        build_plan(graph_dir / "model.onnx", plan, options(graph_dir), lambda m: None)
    assert [p.name for p in tmp_path.iterdir()] == ["nld.plan"] and plan.read_bytes() == b"the previous plan"


def test_a_config_that_does_not_match_the_graph_is_named_before_building(trt, graph_dir, tmp_path):
    other = tmp_path / "graph"
    shutil.copytree(graph_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "head_dim": 8, "num_attention_heads": 8}))
    with pytest.raises(NLDError, match="does not fit the graph input past_key_0"):
        build_plan(other / "model.onnx", tmp_path / "nld.plan", options(other), lambda m: None)
    assert not calls(trt, "build_serialized_network")


def test_missing_or_old_tensorrt_and_missing_cuda_say_what_to_install(monkeypatch, graph_dir, tmp_path, tiny):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as without the wheel
    with pytest.raises(NLDError, match="pip install tensorrt-cu12"):
        build_plan(graph_dir / "model.onnx", tmp_path / "nld.plan", options(graph_dir), lambda m: None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.8.0.43"))
    with pytest.raises(NLDError, match="10.8.0.43 is too old.*>= 10.9"):
        build_plan(graph_dir / "model.onnx", tmp_path / "nld.plan", options(graph_dir), lambda m: None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NLDError, match="CUDA build of PyTorch"):
        build_plan(graph_dir / "model.onnx", tmp_path / "nld.plan", options(graph_dir), lambda m: None)
    with pytest.raises(NLDError, match="needs a CUDA GPU .*--device cpu"):
        TensorRTExecutor(tmp_path / "nld.plan", tiny.config, 2, 64, 8, True)
    assert list(tmp_path.iterdir()) == []


# the executor -----------------------------------------------------------------------------------------
class RecordingSession:
    """Stands in for OnnxExecutor's session: records the feeds of each run."""

    def __init__(self, config):
        self.config, self.feeds = config, []

    def run(self, names, feeds):
        self.feeds.append(feeds)
        b, p = feeds["logit_positions"].shape
        return [np.zeros((b, p, self.config.vocab_size), np.float32)] + [feeds[n.replace("present", "past")]
                                                                         for n in names[1:]]


@pytest.mark.parametrize("all_logits", [True, False])
def test_input_feeds_are_what_the_onnx_runtime_executor_feeds(graph_dir, tiny, all_logits, monkeypatch):
    ort_ex = OnnxExecutor(graph_dir / "model.onnx", tiny.config, max_batch=3, max_seq_len=64, max_chunk=8,
                          has_lora=True)
    ort_ex.session = RecordingSession(tiny.config)
    captured = []  # the Executor inputs of the call, to build our feeds from the same tensors
    original = OnnxExecutor._forward

    def spy(self, **kw):
        captured.append(kw)
        return original(self, **kw)

    monkeypatch.setattr(OnnxExecutor, "_forward", spy)
    rows = [PassRow(Chunk([3, 100, 100, 100], block=True, lora=True), 0, [5]), PassRow(Chunk([4, 5]), 5, [2]),
            PassRow(Chunk([9, 8, 7], block=True), 0, [0])]
    ort_ex.forward(PassBatch(rows, all_logits))
    (ours,), (theirs,) = [input_feeds(**kw) for kw in captured], ort_ex.session.feeds
    graph = onnx.load(str(graph_dir / "model.onnx"), load_external_data=False).graph
    assert list(ours) == list(INPUTS) == [i.name for i in graph.input if not i.name.startswith("past_")]
    for name, value in ours.items():
        assert value.dtype == torch.int32 and value.is_contiguous() and theirs[name].dtype == np.int32, name
        assert value.numpy().tolist() == theirs[name].tolist(), name
    assert ours["logit_positions"].shape == ((3, 4) if all_logits else (3, 1))
    assert ours["committed"].tolist() == [0, 5, 0] and ours["lora"].tolist() == [1, 0, 0]
    scratch = ort_ex.layout.scratch  # 3 x 64 positions in pages of 16: 12 pages, the scratch page is 12
    assert scratch == 12 and ours["page_table"].tolist() == [[p] + [scratch] * 3 for p in (5, 2, 0)]  # full width


@pytest.fixture
def plan(trt, graph_dir, tmp_path):
    path = tmp_path / "nld.plan"
    build_plan(graph_dir / "model.onnx", path, options(graph_dir), lambda m: None)
    trt.calls.clear()
    return path


def test_executor_runs_the_plan_like_onnx_runtime_writing_the_pages_in_place(trt, plan, graph_dir, tiny):
    b, s, blk = LIMITS["max_batch"], LIMITS["max_seq_len"], LIMITS["max_block"]
    ort_ex = OnnxExecutor(graph_dir / "model.onnx", tiny.config, max_batch=b, max_seq_len=s, max_chunk=blk,
                          has_lora=True)
    trt.runner = onnx_runtime_runner(OnnxExecutor(graph_dir / "model.onnx", tiny.config, b, s, blk, True).session)
    trt_ex = TensorRTExecutor(plan, tiny.config, b, s, blk, True, device="cpu")
    assert trt_ex.device == torch.device("cpu") and trt_ex.has_lora and trt_ex.cache["past_key_0"].shape == (
        b * s // 16 + 1, 16, 2, 16)
    assert trt_ex.layout == ort_ex.layout
    assert not trt_ex.takes_embeds  # a text model's plan has no image_rows input (tests/test_vlm_engine.py: a VLM's)
    prompts = [Chunk(list(range(1, 21))), Chunk([1, 9, 10])]  # 20 > max_block: the prefill profile
    steps = [[Chunk([7, 100, 100, 100], block=True, lora=True), Chunk([5, 6, 7, 8])],
             [Chunk([3]), Chunk([4])]]
    results = []
    for ex in (ort_ex, trt_ex):
        pager = Pager(ex)
        tables = [pager.allocate() for _ in prompts]
        out = [pager.forward(tables, prompts, all_logits=False)]
        for t, c in zip(tables, prompts):
            pager.commit(t, len(c.tokens))
        for step in steps:
            out.append(pager.forward(tables, step))
            for t in tables:
                pager.commit(t, 1)
        results.append(out)
    for a, t in zip(*results):
        assert a.shape == t.shape and a.dtype == t.dtype == torch.float32
        assert torch.equal(a, t) and t.std() > 0.1  # the same graph on the same feeds: identical logits
    assert [p for (p,) in calls(trt, "set_optimization_profile_async")] == [1, 0]  # switched only when needed
    runs = calls(trt, "execute_async_v3")
    assert [r[1]["input_ids"] for r in runs] == [(2, 20), (2, 4), (2, 1)]
    assert [r[1]["logit_positions"] for r in runs] == [(2, 1), (2, 4), (2, 1)]
    for addresses, _ in runs:
        for i in range(tiny.config.num_hidden_layers):
            for kv in ("key", "value"):  # one cache, written in place: the same memory in and out, every pass
                assert addresses[f"present_{kv}_{i}"] == addresses[f"past_{kv}_{i}"] == runs[0][0][f"past_{kv}_{i}"]


def test_executor_refuses_shapes_and_plans_it_cannot_run(trt, plan, tiny):
    with pytest.raises(NLDError, match=r"page tables of 4 pages of 16: sequences of at most 64 positions, not "
                                       r"max_seq_len 128"):
        TensorRTExecutor(plan, tiny.config, 2, 128, 8, True, device="cpu")
    with pytest.raises(NLDError, match="could not deserialize"):
        bad = plan.with_name("bad.plan")
        bad.write_bytes(b"\x00 not a plan")
        TensorRTExecutor(bad, tiny.config, 2, 64, 8, True, device="cpu")
    ex = TensorRTExecutor(plan, tiny.config, 2, 64, 8, True, device="cpu")
    with pytest.raises(NLDError, match=r"no optimization profile .* input_ids \(1, 9\) with logit_positions \(1, 9\)"):
        ex.forward(PassBatch([PassRow(Chunk(list(range(1, 10))), 0, [0])]))  # every logit of 9 > max_block
    assert not calls(trt, "execute_async_v3")


def test_a_plan_with_an_fp8_kv_cache_loads_with_fp8_pages(trt, plan, tiny):
    # a 16-bit graph of an FP8 KV-cache checkpoint binds FP8 caches (tests/test_fp8_kv_cache.py): its scales
    # are attributes of the plan's nld::write_kv / nld::block_attention, which quantize and dequantize there
    text = json.loads(plan.read_bytes())
    text["io"] = [[name, mode, "FP8" if name.startswith(("past_", "present_")) else dtype, dims]
                  for name, mode, dtype, dims in text["io"]]
    fp8 = plan.with_name("fp8.plan")
    fp8.write_bytes(json.dumps(text).encode())
    ex = TensorRTExecutor(fp8, tiny.config, 2, 64, 8, True, device="cpu")
    assert ex.layout.dtype == torch.float8_e4m3fn and ex.cache["past_key_0"].dtype == torch.float8_e4m3fn
    assert ex.layout.bytes_per_token == 2 * tiny.config.num_hidden_layers * tiny.config.num_key_value_heads * \
        tiny.config.head_dim
    from nld_trt.kv.attend import PagedCache

    with pytest.raises(NLDError, match="FP8 KV cache needs the checkpoint's k/v scales"):
        PagedCache(ex.layout, "cpu")  # the reference path applies scales itself: it still needs them
