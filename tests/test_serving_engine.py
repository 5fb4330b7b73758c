"""`nld-trt package --engine`: an `nld-trt build` output of the embedded default model, served by a real
tritonserver on CPU (ONNX Runtime executor), answers every mode with the PyTorch executor's tokens; engines
a device cannot run are refused at packaging time."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from nld_trt import load
from nld_trt.engine.build import BuildOptions, build
from nld_trt.errors import NLDError
from nld_trt.runtime import default_model_path
from nld_trt.serving.cli import package_command
from nld_trt.serving.client import GrpcClient, http_generate
from nld_trt.serving.package import ServingOptions, package_repository
from nld_trt.serving.server import TritonServer, find_tritonserver
from nld_trt.serving.stubenv import stub_site

PROMPTS = ["Tom has 3 apples and buys 4 more. How many apples does he have?",
           "A baker makes 12 loaves a day for 5 days and sells 41. How many are left?"]


@pytest.fixture(scope="module")
def embedded_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "tiny-nld"
    report = build(BuildOptions(checkpoint=default_model_path(), output=out, dtype="float32", verify_tokens=24,
                                max_batch=4, max_seq_len=512, max_block=32), progress=lambda _: None)
    return out, report


@pytest.fixture(scope="module")
def embedded():
    return load(default_model_path(), max_batch=4, max_seq_len=512)


def test_the_embedded_model_exports_and_verifies_in_every_mode(embedded_engine):
    _, report = embedded_engine
    assert set(report.verification) == {"ar", "dlm", "linear_spec"}
    assert all(v["identical"] == v["prompts"] == 3 for v in report.verification.values())
    assert report.has_lora and report.plan is None


def test_a_repository_packaged_from_a_build_answers_every_mode_like_the_pytorch_executor(embedded_engine, embedded,
                                                                                          tmp_path):
    try:
        find_tritonserver()
        stub_site()
    except NLDError as e:  # pragma: no cover - the README's install step provides it
        pytest.skip(f"no Triton server here ({e})")
    engine, _ = embedded_engine
    result = CliRunner().invoke(package_command, ["--engine", str(engine), "--output", str(tmp_path / "repo"),
                                                  "--max-batch", "8", "--max-seq-len", "4096"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "repo" / "nld" / "1" / "manifest.json").read_text())
    assert manifest["kind"] == "engine" and "model.onnx" in manifest["files"]
    config = (tmp_path / "repo" / "nld" / "config.pbtxt").read_text()
    # the deployment's limits are clamped to the build's (max_batch 4, max_seq_len 512)
    assert 'key: "max_batch" value { string_value: "4" }' in config
    assert 'key: "max_seq_len" value { string_value: "512" }' in config
    with TritonServer(tmp_path / "repo") as server:
        grpc = GrpcClient(server.grpc_url, timeout=120)
        for mode in ("ar", "dlm", "linear_spec"):
            for prompt in PROMPTS:
                want = embedded.generate(prompt, mode=mode, max_new_tokens=24, block_length=8)
                got = grpc.generate(text_input=prompt, mode=mode, max_tokens=24, block_length=8)
                assert got.token_ids == want.token_ids, (mode, prompt)
                assert got.stats["nfe"] == want.stats.nfe
        unary = http_generate(server.http_url, text_input=PROMPTS[0], mode="linear_spec", max_tokens=24)
        assert unary.token_ids == embedded.generate(PROMPTS[0], mode="linear_spec", max_new_tokens=24).token_ids
        assert server.stop() == 0


@pytest.fixture(scope="module")
def half_engine(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "bf16"
    build(BuildOptions(checkpoint=tiny_dir, output=out, dtype="bf16", verify=False), progress=lambda _: None)
    return out


@pytest.mark.parametrize("device, message", [("cpu", "ONNX Runtime on CPU serves a float32 build"),
                                             ("cuda", "holds no TensorRT plan")])
def test_engines_the_device_cannot_run_are_refused_when_packaging(half_engine, tmp_path, device, message):
    with pytest.raises(NLDError, match=message):
        package_repository(half_engine, tmp_path / "repo", ServingOptions(device=device), engine=True)
    assert not (tmp_path / "repo").exists()


def test_package_engine_names_a_directory_that_is_not_a_build(tiny_dir, tmp_path):
    result = CliRunner().invoke(package_command, ["--engine", str(tiny_dir), "--output", str(tmp_path / "r")])
    assert result.exit_code != 0 and "not an nld-trt build output" in str(result.exception)
    both = CliRunner().invoke(package_command, ["--engine", str(tiny_dir), "--model", str(tiny_dir), "-o", "x"])
    assert both.exit_code == 2 and "not both" in both.output
