"""`nld-trt serve MODEL_DIR`: the packaged repository is cached, keyed by the model's content and the package
options: reused while neither changed, packaged anew when either did, never half-written."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from nld_trt.errors import CheckpointError
from nld_trt.serving import cache as cache_module
from nld_trt.serving.cache import cached_repository, is_repository, model_digest
from nld_trt.serving.cli import serve_command
from nld_trt.serving.package import ServingOptions

OPTIONS = ServingOptions(max_batch=2, max_seq_len=256)


@pytest.fixture
def model(tiny_dir, tmp_path):
    return shutil.copytree(tiny_dir, tmp_path / "model")


def test_an_unchanged_model_and_options_reuse_the_repository(model, tmp_path):
    first, reused = cached_repository(model, OPTIONS, engine=False, cache=tmp_path / "cache")
    assert not reused and is_repository(first)
    stamp = (first / "nld" / "config.pbtxt").stat().st_mtime_ns
    again, reused = cached_repository(model, OPTIONS, engine=False, cache=tmp_path / "cache")
    assert reused and again == first and (again / "nld" / "config.pbtxt").stat().st_mtime_ns == stamp


def test_changed_options_or_model_package_a_new_repository(model, tmp_path):
    cache = tmp_path / "cache"
    first, _ = cached_repository(model, OPTIONS, engine=False, cache=cache)
    other, reused = cached_repository(model, ServingOptions(max_batch=3, max_seq_len=256), engine=False, cache=cache)
    assert not reused and other != first and 'string_value: "3"' in (other / "nld" / "config.pbtxt").read_text()
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight: the same size, another content
    weights.write_bytes(bytes(data))
    changed, reused = cached_repository(model, OPTIONS, engine=False, cache=cache)
    assert not reused and changed not in (first, other)
    assert (changed / "nld" / "1" / "artifacts" / "model.safetensors").read_bytes() == bytes(data)


def test_unchanged_files_are_not_read_again(model, tmp_path, monkeypatch):
    calls = []
    real = cache_module.sha256
    monkeypatch.setattr(cache_module, "sha256", lambda p: calls.append(p.name) or real(p))
    first = model_digest(model, tmp_path)
    assert len(calls) == len([p for p in model.rglob("*") if p.is_file()])
    calls.clear()
    assert model_digest(model, tmp_path) == first and calls == []
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    assert model_digest(model, tmp_path) != first and calls == ["config.json"]


def test_a_directory_that_is_no_model_leaves_nothing_in_the_cache(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError):
        cached_repository(tmp_path / "empty", OPTIONS, engine=False, cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any(is_repository(p) for p in (tmp_path / "cache").iterdir())


def test_serve_refuses_package_options_for_a_packaged_repository(model, tmp_path):
    repo, _ = cached_repository(model, OPTIONS, engine=False, cache=tmp_path / "cache")
    result = CliRunner().invoke(serve_command, [str(repo), "--max-batch", "4", "--openai-port", "0"])
    assert result.exit_code == 2 and "--max-batch: " in result.output and "is a packaged repository" in result.output
