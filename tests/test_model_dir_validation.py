"""Every command that takes a model directory checks it the same way before doing any work: pickled weights
(`pytorch_model.bin`) or a pickled LoRA adapter (`adapter_model.bin`) are refused with one line that says
why (nld-trt never unpickles) and gives the command that converts them, and that command really works."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nld_trt import load
from nld_trt.checkpoint import LORA_DIR


@pytest.fixture()
def pickled_model(tiny_dir, tmp_path):
    """The tiny checkpoint with its weights as a real torch pickle and no safetensors."""
    d = shutil.copytree(tiny_dir, tmp_path / "pickled-model")
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


@pytest.fixture()
def sharded_pickled_model(tiny_dir, tmp_path):
    """The same as two pickled shards with transformers' index file."""
    d = shutil.copytree(tiny_dir, tmp_path / "sharded-pickled-model")
    tensors = load_file(d / "model.safetensors")
    names = sorted(tensors)
    shards = {f"pytorch_model-0000{i + 1}-of-00002.bin": names[i::2] for i in range(2)}
    for shard, group in shards.items():
        torch.save({n: tensors[n] for n in group}, d / shard)
    index = {"metadata": {}, "weight_map": {n: shard for shard, group in shards.items() for n in group}}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (d / "model.safetensors").unlink()
    return d


@pytest.fixture()
def pickled_adapter(tiny_dir, tmp_path):
    """The tiny checkpoint with its linear_spec_lora/ adapter as a torch pickle only."""
    d = shutil.copytree(tiny_dir, tmp_path / "pickled-adapter")
    lora = d / LORA_DIR
    torch.save(load_file(lora / "adapter_model.safetensors"), lora / "adapter_model.bin")
    (lora / "adapter_model.safetensors").unlink()
    return d


def run_main(capsys, *args) -> tuple[int, str]:
    from nld_trt.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code, capsys.readouterr().err


def commands(model, out):
    """Each command that reads a model directory, pointed at `model`."""
    return {
        "generate": ["generate", "--model", str(model), "--max-new-tokens", "2", "hi"],
        "info": ["info", "--model", str(model)],
        "eval": ["eval", "--model", str(model), "--tasks", "gsm_synth", "--limit", "1", "--max-new-tokens", "2"],
        "quantize": ["quantize", "--model", str(model), "--qformat", "fp8", "--output", str(out), "--no-compare"],
        "build": ["build", "--checkpoint", str(model), "--output", str(out), "--onnx-only", "--no-verify"],
        "package": ["package", "--model", str(model), "--output", str(out)],
        "demo": ["demo", "--model", str(model), "--max-tokens", "2"],
    }


def refusal(err: str, what: str) -> str:
    """The one-line error, checked for what it must say; returns the conversion command it gives."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("Error: ") and what in line and "never unpickles" in line, line
    command = re.search(r"`(python -c .*)`", line)
    assert command, line
    return command.group(1)


@pytest.mark.parametrize("command", list(commands("M", "O")))
def test_every_model_command_refuses_pickled_weights_the_same_way(pickled_model, tmp_path, capsys, command):
    out = tmp_path / "out"
    code, err = run_main(capsys, *commands(pickled_model, out)[command])
    assert code == 1
    refusal(err, "pytorch_model.bin")
    _, expected = run_main(capsys, *commands(pickled_model, out)["package"])
    assert err == expected  # one validation, one message
    assert not out.exists()


@pytest.mark.parametrize("command", ["package", "generate", "info"])
def test_a_pickled_lora_adapter_is_refused(pickled_adapter, tmp_path, capsys, command):
    out = tmp_path / "out"
    code, err = run_main(capsys, *commands(pickled_adapter, out)[command])
    assert code == 1
    refusal(err, "adapter_model.bin")
    assert not out.exists()


def test_no_lora_never_reads_the_adapter(pickled_adapter, capsys):
    from nld_trt.cli import main

    main(["generate", "--model", str(pickled_adapter), "--no-lora", "--max-new-tokens", "2", "--json", "hi"])
    assert '"token_ids"' in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["model", "sharded", "adapter"])
def test_the_conversion_command_in_the_message_works(request, tiny, capsys, kind):
    directory = request.getfixturevalue({"model": "pickled_model", "sharded": "sharded_pickled_model",
                                         "adapter": "pickled_adapter"}[kind])
    code, err = run_main(capsys, "info", "--model", str(directory))
    assert code == 1
    command = refusal(err, {"model": "pytorch_model.bin", "sharded": "pytorch_model-00001-of-00002.bin",
                            "adapter": "adapter_model.bin"}[kind])
    assert command.startswith("python -c ")
    subprocess.run(f"{sys.executable} {command[len('python '):]}", shell=True, check=True, timeout=120)
    converted = load(directory, max_batch=1, max_seq_len=512)
    for (name, a), b in zip(converted.model.state_dict().items(), tiny.model.state_dict().values()):
        assert torch.equal(a, b), name
    for i, (a, b) in tiny.lora.layers.items():
        assert torch.equal(converted.lora.layers[i][0], a) and torch.equal(converted.lora.layers[i][1], b)
