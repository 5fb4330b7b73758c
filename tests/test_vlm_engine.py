"""Engine builds of a vision-language model take images: the text graph's `image_rows` input (ids >= vocab_size
index it) fed by the ONNX Runtime executor, images encoded through the build's vision.onnx. Against the plain
path (the PyTorch checkpoint, prefix cache off): every mode, batched with text, a second turn served from the
prefix cache; text-only passes feed one zero row; a build without the input (an older nld-trt's) refuses images
saying why. The TensorRT side (plan profiles, executor, vision plan) against the stand-in TensorRT."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import onnx
import pytest
import torch

from nld_trt import load
from nld_trt.config import NLDConfig
from nld_trt.engine.build import BuildOptions, build, export_to
from nld_trt.engine import loader
from nld_trt.engine.loader import image_refusal
from nld_trt.engine.trt_build import build_plan, build_vision_plan, profile_shapes
from nld_trt.errors import GenerationError
from nld_trt.executors.base import Chunk, ChunkEmbeds, PassBatch, PassRow
from nld_trt.executors.graph_io import IMAGE_ROWS
from nld_trt.executors.onnx_executor import OnnxExecutor
from nld_trt.executors.trt_executor import TensorRTExecutor
from nld_trt.vision.engine import OnnxVisionEncoder, TensorRTVisionEncoder

from test_trt_stand_in import calls, fake_tensorrt, memory, onnx_runtime_runner
from test_vlm_generate import A, B, PROMPTS, chat, picture

LIMITS = dict(max_batch=4, max_seq_len=256, max_block=32)


@pytest.fixture(scope="module")
def engine_dir(tiny_vlm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm_engine") / "engine"
    build(BuildOptions(checkpoint=tiny_vlm_dir, output=out, dtype="float32", onnx_only=True, verify=False, **LIMITS),
          lambda _: None)
    return out


@pytest.fixture(scope="module")
def engine(engine_dir, tmp_path_factory):
    return load(engine_dir, max_batch=4, max_seq_len=256, max_block_length=32,
                calibration_dir=tmp_path_factory.mktemp("calibration"))


@pytest.fixture(scope="module")
def plain(tiny_vlm_dir, tmp_path_factory):
    """The oracle: the PyTorch checkpoint, no prefix cache."""
    return load(tiny_vlm_dir, max_batch=4, max_seq_len=256, prefix_cache=False,
                calibration_dir=tmp_path_factory.mktemp("calibration"))


def test_the_build_runs_images_through_its_own_graphs(engine):
    assert isinstance(engine.executor, OnnxExecutor) and engine.executor.takes_embeds
    assert isinstance(engine.image_encoder.encoder, OnnxVisionEncoder)
    assert engine.prompts.processor is not None


@pytest.mark.parametrize("mode", ["ar", "dlm", "linear_spec", "auto"])
def test_an_engine_build_gives_the_checkpoints_tokens_with_images_batched_with_text(engine, plain, mode):
    kw = dict(mode=mode, max_new_tokens=16, block_length=8, eos_token_ids=())
    got, want = engine.generate(PROMPTS, **kw), plain.generate(PROMPTS, **kw)
    for g, w in zip(got, want):
        assert g.prompt_token_ids == w.prompt_token_ids and g.images == w.images
        assert g.token_ids == w.token_ids


def test_the_image_rows_reach_the_engine_graph(engine, plain):
    kw = dict(mode="ar", max_new_tokens=10, eos_token_ids=())
    with_a, with_b = (engine.generate(chat(x, "What is in the picture?"), **kw) for x in (A, B))
    assert with_a.token_ids != with_b.token_ids
    assert with_b.token_ids == plain.generate(chat(B, "What is in the picture?"), **kw).token_ids


def test_a_second_turn_with_the_same_image_is_served_from_the_prefix_cache(engine, plain):
    system = [{"role": "system", "content": "You are a careful assistant who looks closely at every picture."}]
    image = picture(112, 84, 41)
    turn1 = system + chat(image, "What is it?")
    first = engine.generate(turn1, mode="ar", max_new_tokens=10)
    assert first.token_ids == plain.generate(turn1, mode="ar", max_new_tokens=10).token_ids
    encoded = engine.image_encoder.encoded_images
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And its colour?"}]
    for mode in ("ar", "dlm", "linear_spec"):
        second = engine.generate(turn2, mode=mode, max_new_tokens=10, block_length=8)
        assert second.stats.cached_tokens >= second.images[0]["end"]  # the image's pages came from the cache
        assert second.token_ids == plain.generate(turn2, mode=mode, max_new_tokens=10, block_length=8).token_ids
    assert engine.image_encoder.encoded_images == encoded  # nor was the image encoded again


def test_text_only_passes_feed_one_zero_row_and_match_the_checkpoint(engine, plain, monkeypatch):
    rows = []
    run = engine.executor.session.run

    def spy(names, feeds):
        rows.append((feeds[IMAGE_ROWS].shape, bool(np.any(feeds[IMAGE_ROWS])),
                     int(feeds["input_ids"].max()) >= engine.config.vocab_size))
        return run(names, feeds)

    monkeypatch.setattr(engine.executor.session, "run", spy)
    for mode in ("ar", "dlm"):
        kw = dict(mode=mode, max_new_tokens=12, block_length=8, eos_token_ids=())
        want = plain.generate("A plain question.", **kw).token_ids
        assert engine.generate("A plain question.", **kw).token_ids == want
    assert rows and set(rows) == {((1, engine.config.hidden_size), False, False)}
    rows.clear()
    engine.generate(chat(picture(56, 56, 42), "Hm?"), mode="ar", max_new_tokens=2)
    (shape, nonzero, image_ids), *rest = rows  # the prefill: 2 x 2 cells, their ids past the vocabulary
    assert shape == (4, engine.config.hidden_size) and nonzero and image_ids
    assert all(r == ((1, engine.config.hidden_size), False, False) for r in rest)


@pytest.fixture(scope="module")
def old_build(engine_dir, tiny_vlm, tmp_path_factory):
    """The same build with the text graph of an nld-trt before the image-rows input."""
    out = tmp_path_factory.mktemp("old") / "engine"
    shutil.copytree(engine_dir, out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(NLDConfig, "is_vlm", property(lambda self: False))
        for f in ("model.onnx", "model.onnx.data"):
            (out / f).unlink()
        export_to(out, tiny_vlm.model, torch.float32, 16)
    return out


def test_an_older_build_loads_serves_text_and_refuses_images_saying_why(old_build, engine, plain):
    graph = onnx.load(str(old_build / "model.onnx"), load_external_data=False).graph
    assert IMAGE_ROWS not in {i.name for i in graph.input}
    old = load(old_build, max_batch=2, max_seq_len=256, max_block_length=32)
    assert not old.executor.takes_embeds and old.image_encoder is None
    kw = dict(mode="ar", max_new_tokens=8, eos_token_ids=())
    assert old.generate("A plain question.", **kw).token_ids == plain.generate("A plain question.", **kw).token_ids
    with pytest.raises(GenerationError, match=r"messages\[0\]\.content\[0\]: .* is an engine build that takes text "
                                              r"prompts only: its text graph has no input for image rows \(an older "
                                              r"nld-trt built it\); rebuild it"):
        old.generate(chat(A, "What is it?"))
    rows = ChunkEmbeds((1,), torch.zeros(1, old.config.hidden_size))  # and its executor, asked directly
    with pytest.raises(GenerationError, match="OnnxExecutor has no input for image embeddings .* rebuild it"):
        old.executor.forward(PassBatch([PassRow(Chunk([1, 2], embeds=rows), 0, [0])]))


def test_image_refusal_names_what_a_build_lacks(engine_dir, old_build, tmp_path):
    assert image_refusal(engine_dir, "cpu") is None
    assert "no input for image rows" in image_refusal(old_build, "cpu")
    assert image_refusal(engine_dir, "cuda") == "it holds no vision encoder plan (vision.plan) for TensorRT"
    bare = shutil.copytree(engine_dir, tmp_path / "bare")
    (bare / "vision.onnx").unlink()
    assert image_refusal(bare, "cpu") == "it holds no vision encoder graph (vision.onnx)"


# TensorRT (the stand-in of tests/test_trt_stand_in.py) -----------------------------------------------------
@pytest.fixture
def trt(monkeypatch):
    fake = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    import nld_trt.plugins.trt as nld_plugins

    monkeypatch.setattr(nld_plugins, "register_all", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return fake


def test_the_plan_profiles_image_rows_and_runs_image_chunks_like_onnx_runtime(trt, engine_dir, engine, plain,
                                                                              tmp_path, monkeypatch):
    options = BuildOptions(checkpoint=None, output=engine_dir, **LIMITS)
    plan = tmp_path / "nld.plan"
    build_plan(engine_dir / "model.onnx", plan, options, lambda _: None)
    decode, prefill = profile_shapes(options, engine.config)
    h = engine.config.hidden_size
    assert decode[IMAGE_ROWS] == ((1, h), (1, h), (4 * 32, h)) and prefill[IMAGE_ROWS] == ((1, h), (1, h), (4 * 256, h))
    trt.runner = onnx_runtime_runner(engine.executor.session)
    trt_ex = TensorRTExecutor(plan, engine.config, 4, 256, 32, engine.executor.has_lora, device="cpu")
    assert trt_ex.takes_embeds
    # the same build with its passes through the TensorRT executor (its plan "run" by ONNX Runtime)
    monkeypatch.setattr(loader, "open_engine", lambda *args, **kwargs: trt_ex)
    on_trt = load(engine_dir, max_batch=4, max_seq_len=256, max_block_length=32)
    assert on_trt.executor is trt_ex
    kw = dict(mode="linear_spec", max_new_tokens=10, block_length=8, eos_token_ids=())
    got = on_trt.generate([PROMPTS[0], PROMPTS[1]], **kw)
    want = plain.generate([PROMPTS[0], PROMPTS[1]], **kw)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    shapes = [r[1][IMAGE_ROWS] for r in calls(trt, "execute_async_v3")]
    assert shapes[0][0] > 1 and set(shapes[1:]) == {(1, h)}  # the image prefill, then one zero row per pass


def test_the_vision_plan_encodes_like_the_vision_graph(trt, engine_dir, engine, tmp_path):
    plan = tmp_path / "vision.plan"
    build_vision_plan(engine_dir / "vision.onnx", plan, 336, 28, lambda _: None)
    session = engine.image_encoder.encoder.session

    def run(context):  # the stand-in cannot infer the rows' count from H x W: the graph's own output sizes it
        pixels = memory(context.addresses["pixel_values"], context.shapes["pixel_values"], np.float32).copy()
        (rows,) = session.run(["image_rows"], {"pixel_values": pixels})
        memory(context.addresses["image_rows"], rows.shape, np.float32)[...] = rows

    trt.runner = run
    encoder = TensorRTVisionEncoder(plan, engine.vlm, device="cpu")
    pixels = [torch.randn(3, 56, 84, generator=torch.Generator().manual_seed(5)), torch.randn(3, 28, 28)]
    for got, want in zip(encoder(pixels), engine.image_encoder.encoder(pixels)):
        assert got.shape == want.shape and torch.equal(got, want)
    with pytest.raises(Exception, match="takes images from 28 x 28 to 336 x 336 pixels, not 28 x 364"):
        encoder([torch.zeros(3, 28, 364)])
