"""The benchmark scripts run (figures are theirs to print, not the tests' to check) and refuse clearly
when asked for a GPU that is not there."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_executor_times_every_pass_kind_for_each_batch(capsys):
    assert _script("bench_executor").main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--reps", "1",
                                           "--context", "16", "--block", "4", "--batches", "1,2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert [r.split()[0] for r in rows] == ["1"] * 3 + ["2"] * 3
    assert all(float(r.split()[-1]) > 0 for r in rows)


def test_bench_executor_says_what_a_cuda_run_needs(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert _script("bench_executor").main(["--device", "cuda"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_executor_compares_with_transformers_static_cache(capsys):
    assert _script("bench_executor").main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--reps", "1",
                                           "--context", "8", "--block", "4", "--batches", "1",
                                           "--transformers", "eager", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "4-token block pass / 1-token pass" in out
    assert "transformers generate() static cache (eager)" in out and "as fast" in out


def test_bench_executor_refuses_gpu_variants_on_cpu(capsys):
    assert _script("bench_executor").main(["--shape", "tiny", "--device", "cpu", "--variants", "graphs"]) == 2
    assert "need --device cuda" in capsys.readouterr().err


def test_bench_modes_prints_every_mode_and_the_ratios(capsys):
    from click.testing import CliRunner

    result = CliRunner().invoke(_script("bench_modes").main, ["--prompts", "1", "--max-new-tokens", "4",
                                                              "--no-compiled", "--json"])
    assert result.exit_code == 0, result.output
    summary = __import__("json").loads(result.stdout)
    assert set(summary["rows"]) == {"ar eager", "ar transformers", "dlm eager", "linear_spec eager"}
    assert summary["tokens_equal_to_eager"] == {"ar transformers": "1/1"}
    assert summary["ratios"]["ar eager / transformers ar"] > 0


def test_bench_images_compares_each_mode_with_and_without_an_image_and_times_the_encoder():
    from click.testing import CliRunner

    result = CliRunner().invoke(_script("bench_images").main, ["--random", "tiny", "--prompts", "2", "--max-new-tokens",
                                                               "4", "--encode-sizes", "56,100x60", "--encode-reps", "1",
                                                               "--image-size", "90x60", "--json"])
    assert result.exit_code == 0, result.output
    summary = __import__("json").loads(result.stdout)
    assert set(summary["rows"]) == {f"{m} {k}" for m in ("ar", "dlm", "linear_spec") for k in ("text", "image")}
    for mode in ("ar", "dlm", "linear_spec"):
        image, text = summary["rows"][f"{mode} image"], summary["rows"][f"{mode} text"]
        assert image["prompt_tokens"] == text["prompt_tokens"] + 1 + 3 * (4 + 1)  # the 90x60 image: 3 x 4 cells
        assert image["tokens"] == text["tokens"] == 8
    assert [r["cells"] for r in summary["encode"]] == [4, 12] and all(r["encode_ms"] > 0 for r in summary["encode"])


def test_bench_serving_images_measures_the_stall_with_the_encoder_on_either_thread(tmp_path):
    from click.testing import CliRunner

    out = tmp_path / "stall.json"
    result = CliRunner().invoke(_script("bench_serving").main, ["--images", "--random", "tiny", "--sections", "stall",
                                                                "--stall-size", "280x280", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = __import__("json").loads(out.read_text())["stall"]
    assert [r["workers"] for r in rows] == [0, 1, 0, 1]
    assert all(r["encode_s"] > 0 and r["image_ttft_s"] > 0 and r["during_responses"] >= 1 for r in rows)
    assert "a text request's inter-token latency" in result.output
