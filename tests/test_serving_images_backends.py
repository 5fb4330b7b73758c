"""Quantized and engine-built vision-language repositories, served by a real tritonserver (`nld-trt serve`, the
OpenAI front end in front).

A quantized VLM checkpoint (FP8 text backbone, the tower and projector kept beside it in
model-vision.safetensors, a preprocessor_config.json that changes the longest edge) packages with every one of
those files under the manifest and serves images with the tokens of the same quantized checkpoint in-process.
An engine build of a VLM (`package --engine`) serves images through its own graphs (vision.onnx, the text graph's
image_rows input) with the checkpoint's tokens; an older build without that input says why it refuses them.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from openai_stack import require_stack, start_stack

require_stack()

import openai  # noqa: E402

from nld_trt import load  # noqa: E402
from nld_trt.config import NLDConfig  # noqa: E402
from nld_trt.engine.build import BuildOptions, build, export_to  # noqa: E402
from nld_trt.errors import CheckpointError  # noqa: E402
from nld_trt.serving.client import GrpcClient  # noqa: E402
from nld_trt.serving.manifest import verify_manifest  # noqa: E402
from nld_trt.serving.package import ServingOptions, package_repository  # noqa: E402

from test_serving_images import A, URL_A, encoded, data_url, image_part, picture, turn  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:modelopt")
OPTIONS = ServingOptions(max_batch=4, max_seq_len=256, max_tokens_cap=32, torch_threads=1)
WIDE = picture(500, 300, 7)  # capped to a longest edge of 336 by the checkpoint's preprocessor_config.json


@pytest.fixture(scope="module")
def quantized(tiny_vlm_dir, tmp_path_factory):
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")
    from click.testing import CliRunner

    from nld_trt.quant.cli import quantize_command

    work = tmp_path_factory.mktemp("qvlm")
    source = shutil.copytree(tiny_vlm_dir, work / "source")
    (source / "preprocessor_config.json").write_text(json.dumps({"size": {"longest_edge": 336}}))
    out = work / "fp8"
    result = CliRunner().invoke(quantize_command, [
        "--model", str(source), "--qformat", "fp8", "--output", str(out), "--calib-size", "8", "--calib-seq-len",
        "160", "--block-length", "8", "--image-mix", "0.5", "--eval-size", "2", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    return out


def test_a_quantized_vlm_repository_verifies_its_vision_files_and_serves_images(quantized, tmp_path):
    repo = package_repository(quantized, tmp_path / "repo", OPTIONS)
    manifest = repo / "nld" / "1" / "manifest.json"
    files = json.loads(manifest.read_text())["files"]
    assert {"model-vision.safetensors", "preprocessor_config.json"} <= set(files)
    params = (repo / "nld" / "config.pbtxt").read_text()
    assert 'key: "images" value { string_value: "true" }' in params

    reference = load(quantized, max_batch=4, max_seq_len=256)
    assert reference.prompts.processor.config.longest_edge == 336
    stack = start_stack(repo, tmp_path)
    try:
        with GrpcClient(stack.grpc_url, timeout=120) as grpc:
            for mode in ("ar", "linear_spec"):
                want = reference.generate(turn(image_part(data_url(encoded(WIDE))), "What is it?"), mode=mode,
                                          max_new_tokens=10, block_length=8)
                got = grpc.generate(text_input="What is it?", image_bytes_input=np.asarray(WIDE)[None], mode=mode,
                                    max_tokens=10, block_length=8)
                assert got.token_ids == want.token_ids and got.stats["prompt_tokens"] == len(want.prompt_token_ids)
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        want = reference.generate(turn(image_part(URL_A), "What is it?"), max_new_tokens=10)
        r = client.chat.completions.create(model="nld", messages=turn(image_part(URL_A), "What is it?"), max_tokens=10)
        assert r.choices[0].message.content == want.text
    finally:
        assert stack.stop() == 0, stack.log.read_text()[-3000:]

    shutil.copy(repo / "nld" / "1" / "artifacts" / "config.json",  # a swapped tower: the load names the file
                repo / "nld" / "1" / "artifacts" / "model-vision.safetensors")
    with pytest.raises(CheckpointError, match="artifact model-vision.safetensors is"):
        verify_manifest(manifest)


def test_an_engine_repository_of_a_vlm_answers_image_requests_with_the_checkpoints_tokens(tiny_vlm, tiny_vlm_dir,
                                                                                          tmp_path):
    engine = tmp_path / "engine"
    build(BuildOptions(checkpoint=tiny_vlm_dir, output=engine, max_batch=2, max_seq_len=256, max_block=32,
                       dtype="float32", onnx_only=True, verify=False), lambda _: None)
    repo = package_repository(engine, tmp_path / "repo", OPTIONS, engine=True)
    assert 'key: "images" value { string_value: "true" }' in (repo / "nld" / "config.pbtxt").read_text()
    manifest = json.loads((repo / "nld" / "1" / "manifest.json").read_text())
    assert {"vision.onnx", "vision.onnx.data"} <= set(manifest["files"])
    stack = start_stack(repo, tmp_path)
    try:  # the oracle: the PyTorch checkpoint in-process
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        for parts in (("What is it?",), (image_part(URL_A), "What is it?")):
            want = tiny_vlm.generate(turn(*parts), max_new_tokens=6)
            r = client.chat.completions.create(model="nld", messages=turn(*parts), max_tokens=6)
            assert r.choices[0].message.content == want.text
        with GrpcClient(stack.grpc_url, timeout=120) as grpc:  # Triton's own inputs
            for mode in ("ar", "linear_spec"):
                want = tiny_vlm.generate(turn(image_part(URL_A), "What is it?"), mode=mode, max_new_tokens=8,
                                         block_length=8)
                got = grpc.generate(text_input="What is it?", image_bytes_input=np.asarray(A)[None], mode=mode,
                                    max_tokens=8, block_length=8)
                assert got.token_ids == want.token_ids and got.stats["prompt_tokens"] == len(want.prompt_token_ids)
    finally:
        assert stack.stop() == 0, stack.log.read_text()[-3000:]


def test_an_older_engine_repository_of_a_vlm_says_why_it_refuses_images(tiny_vlm, tiny_vlm_dir, tmp_path):
    """A build whose text graph lacks the image-rows input (an older nld-trt's): its repository's `images`
    parameter carries the reason, which the front end answers image requests with (a 400 naming the part)."""
    engine = tmp_path / "engine"
    build(BuildOptions(checkpoint=tiny_vlm_dir, output=engine, max_batch=2, max_seq_len=256, max_block=32,
                       dtype="float32", onnx_only=True, verify=False), lambda _: None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(NLDConfig, "is_vlm", property(lambda self: False))
        export_to(engine, tiny_vlm.model, torch.float32, 16)
    repo = package_repository(engine, tmp_path / "repo", OPTIONS, engine=True)
    assert ("is an engine build that takes text prompts only: its text graph has no input for image rows (an older "
            "nld-trt built it)") in (repo / "nld" / "config.pbtxt").read_text()
