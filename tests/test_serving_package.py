"""`nld-trt package`: the repository layout, its config, and the artifact manifest (no server needed)."""

from __future__ import annotations

import json
import shutil

import pytest

from nld_trt.errors import CheckpointError, NLDError
from nld_trt.serving.cli import main as serving_main
from nld_trt.serving.manifest import verify_manifest
from nld_trt.serving.package import ServingOptions, package_repository
from nld_trt.serving.protocol import INPUTS, OUTPUTS
from nld_trt.serving.tokenize import INPUTS as TOKENIZER_INPUTS
from nld_trt.serving.tokenize import OUTPUTS as TOKENIZER_OUTPUTS


@pytest.fixture(scope="module")
def repo(tiny_dir, tmp_path_factory):
    return package_repository(tiny_dir, tmp_path_factory.mktemp("pkg") / "repo",
                              ServingOptions(max_batch=4, max_seq_len=256, max_tokens_cap=5000))


def test_layout_and_configs(repo, tiny_dir):
    assert sorted(p.name for p in repo.iterdir()) == ["nld", "nld_sync", "nld_tokenizer"]
    tokenizer = (repo / "nld_tokenizer" / "config.pbtxt").read_text()
    assert 'key: "manifest" value { string_value: "../nld/1/manifest.json" }' in tokenizer and "kind: KIND_CPU" in tokenizer
    assert all(f'name: "{t.name}"' in tokenizer for t in TOKENIZER_INPUTS + TOKENIZER_OUTPUTS)
    assert "tokenizer_model import TritonPythonModel" in (repo / "nld_tokenizer" / "1" / "model.py").read_text()
    assert 'key: "tokenizer_model" value { string_value: "nld_tokenizer" }' in (repo / "nld" / "config.pbtxt").read_text()
    for name, decoupled, manifest in (("nld", "true", "1/manifest.json"), ("nld_sync", "false", "../nld/1/manifest.json")):
        config = (repo / name / "config.pbtxt").read_text()
        assert f'name: "{name}"' in config and 'backend: "python"' in config
        assert f"decoupled: {decoupled}" in config and "max_batch_size: 4" in config
        assert f'key: "manifest" value {{ string_value: "{manifest}" }}' in config
        assert all(f'name: "{t.name}"' in config for t in INPUTS + OUTPUTS)
        assert str(repo) not in config and str(tiny_dir) not in config  # relative paths only
        assert "from nld_trt.serving.triton_model import TritonPythonModel" in (repo / name / "1" / "model.py").read_text()
    # the cap is clamped to what the cache can hold; the tokenizer travels with the weights
    assert 'key: "max_tokens_cap" value { string_value: "255" }' in (repo / "nld" / "config.pbtxt").read_text()
    artifacts = repo / "nld" / "1" / "artifacts"
    assert {"tokenizer.json", "chat_template.jinja", "config.json"} <= {p.name for p in artifacts.iterdir()}


def test_manifest_hashes_every_artifact_and_survives_a_move(repo, tmp_path):
    root, manifest = verify_manifest(repo / "nld" / "1" / "manifest.json")
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == files and "linear_spec_lora/adapter_model.safetensors" in files
    moved = shutil.copytree(repo, tmp_path / "elsewhere")
    root, _ = verify_manifest(moved / "nld_sync" / ".." / "nld" / "1" / "manifest.json")
    assert root == (moved / "nld" / "1" / "artifacts").resolve()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "is truncated"),
    ("flip", "was modified: SHA-256"),
    ("delete", "is missing"),
    ("extra", "does not list"),
])
def test_tampered_artifacts_are_named(repo, tmp_path, damage, message):
    copy = shutil.copytree(repo, tmp_path / "repo")
    weights = copy / "nld" / "1" / "artifacts" / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        weights.unlink()
    else:
        (weights.parent / "stray.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=message) as e:
        verify_manifest(copy / "nld" / "1" / "manifest.json")
    assert "nld-trt package" in str(e.value)


def test_package_is_atomic_and_refuses_to_clobber(repo, tiny_dir, tmp_path):
    with pytest.raises(NLDError, match="already exists"):
        package_repository(tiny_dir, repo)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(NLDError):
        package_repository(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no partial directory left


def test_package_command(tiny_dir, tmp_path, capsys):
    serving_main(["package", "--model", str(tiny_dir), "--output", str(tmp_path / "r"), "--max-batch", "2",
                  "--no-sync-model", "--threads", "1"])
    out = capsys.readouterr().out
    assert "wrote" in out and "nld-trt serve" in out
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["nld", "nld_tokenizer"]
    config = (tmp_path / "r" / "nld" / "config.pbtxt").read_text()
    assert "max_batch_size: 2" in config and 'key: "torch_threads" value { string_value: "1" }' in config
    assert 'key: "kv_events" value { string_value: "true" }' in config  # the default: published
    json.loads((tmp_path / "r" / "nld" / "1" / "manifest.json").read_text())
    serving_main(["package", "--model", str(tiny_dir), "--output", str(tmp_path / "quiet"), "--no-kv-events"])
    assert 'key: "kv_events" value { string_value: "false" }' in (tmp_path / "quiet" / "nld" / "config.pbtxt").read_text()
