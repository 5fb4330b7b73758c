"""The vision encoder's own ONNX graph (dynamic image size) equals the PyTorch encoder under ONNX Runtime;
`nld-trt build` of a VLM writes and verifies it beside the text graph (whose verification runs an image
prompt); its TensorRT step (stand-in)."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from nld_trt.engine.build import BuildOptions, build
from nld_trt.engine.trt_build import build_vision_plan, vision_profile
from nld_trt.vision.onnx_export import export_vision_graph

from test_trt_stand_in import calls, fake_tensorrt


@pytest.fixture(scope="module")
def vision_graph(tiny_vlm, tmp_path_factory):
    return export_vision_graph(tiny_vlm.image_encoder.encoder, tmp_path_factory.mktemp("vgraph"), torch.float32)


def test_the_vision_graph_equals_the_pytorch_encoder_at_any_image_size(vision_graph, tiny_vlm):
    encoder = tiny_vlm.image_encoder.encoder
    proto = onnx.load(str(vision_graph), load_external_data=False)
    (inp,) = proto.graph.input
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 3, "height", "width"]
    session = ort.InferenceSession(str(vision_graph), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    for h, w in ((28, 28), (56, 84), (140, 84), (84, 196), (28, 280)):  # the graph was traced at 56 x 84
        pixels = torch.randn(1, 3, h, w, generator=g)
        with torch.no_grad():
            ref = encoder([pixels[0]])[0].numpy()
        got = session.run(None, {"pixel_values": pixels.numpy()})[0]
        assert got.shape == ((h // 28) * (w // 28), tiny_vlm.config.hidden_size)
        assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_build_of_a_vlm_writes_and_verifies_the_vision_graph(tiny_vlm_dir, tmp_path):
    out = tmp_path / "engine"
    messages = []
    report = build(BuildOptions(checkpoint=tiny_vlm_dir, output=out, max_batch=2, max_seq_len=256, max_block=8,
                                dtype="bf16", onnx_only=True, verify_tokens=8), messages.append)
    assert report.vision["graph"] == "vision.onnx" and report.vision["dtype"] == "bf16"
    check = report.vision["verification"]
    assert check["graph"] == "float32 twin of the bf16 graph" and check["max_relative_error"] <= 1e-4
    assert len(check["images"]) == 4
    assert json.loads((out / "engine.json").read_text())["vision"] == report.vision
    proto = onnx.load(str(out / "vision.onnx"), load_external_data=False)
    weights = [t for t in proto.graph.initializer if t.name.endswith("weight")]
    assert weights and all(t.data_type == onnx.TensorProto.BFLOAT16 for t in weights)
    assert (out / "vision.onnx.data").is_file() and not (out / ".verify-vision").exists()
    assert any("vision graph" in m for m in messages)
    # the text graph's verification ran an image prompt too (its image_rows input; tests/test_vlm_engine.py)
    assert all(v["identical"] == v["prompts"] == 4 and v["with_images"] == 1
               for k, v in report.verification.items() if k != "graph")
    text = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    (rows,) = [i for i in text.input if i.name == "image_rows"]
    assert rows.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16


def test_the_vision_plan_is_built_beside_the_text_engine_with_an_image_size_profile(vision_graph, tmp_path, monkeypatch):
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    plan = tmp_path / "vision.plan"
    build_vision_plan(vision_graph, plan, 1400, 28, lambda m: None)
    assert calls(trt, "parse_from_file") == [(str(vision_graph),)]
    assert not calls(trt, "register_all")  # no nld:: plugins in the vision graph
    (profiles,), = calls(trt, "build_serialized_network")
    assert profiles == [vision_profile(1400, 28)]
    assert vision_profile(1400, 28)["pixel_values"] == ((1, 3, 28, 28), (1, 3, 672, 672), (1, 3, 1400, 1400))
    assert vision_profile(1000, 28)["pixel_values"][2] == (1, 3, 1008, 1008)  # the longest edge rounded up to cells
    assert [p.name for p in tmp_path.iterdir()] == ["vision.plan"]
