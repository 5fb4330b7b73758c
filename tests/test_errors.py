"""Bad checkpoints and bad requests fail with one clear message naming what is wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from nld_trt import CheckpointError, GenerationError, load
from nld_trt.tiny import make_tiny_checkpoint


@pytest.fixture()
def ckpt(tiny_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, dst)
    return dst


def edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (ckpt / "config.json").write_text(json.dumps(cfg))


def edit_weights(ckpt, fn):
    tensors = load_file(ckpt / "model.safetensors")
    fn(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def test_both_model_type_spellings_load(ckpt):
    edit_config(ckpt, model_type="ministral_dlm")
    assert load(ckpt).config.model_type == "ministral_dlm"


def test_sharded_checkpoint_loads_and_matches_single_file(tiny_dir, tmp_path, tiny):
    sharded = make_tiny_checkpoint(tmp_path / "sharded", seed=0, std=0.15, shards=3)
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    model = load(sharded, max_batch=1, max_seq_len=512)
    for (name, a), b in zip(model.model.state_dict().items(), tiny.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(mask_token_id=None), "no mask_token_id"),
        (dict(model_type="llama"), "model_type is 'llama'"),
        (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
        (dict(mask_token_id=100000), "outside the vocabulary"),
        (dict(dlm_type="mdlm"), "dlm_type 'mdlm'"),
        (dict(num_hidden_layers=3), "missing tensors encoder.layers.2"),
        (dict(num_hidden_layers=1), "unexpected tensors encoder.layers.1"),
        (dict(hidden_size=128), "has shape"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6}), "YaRN rope_parameters need"),
    ],
)
def test_bad_config_is_named(ckpt, change, message):
    edit_config(ckpt, **change)
    with pytest.raises(CheckpointError, match=message):
        load(ckpt)


def test_shape_mismatch_names_tensor_and_both_shapes(ckpt):
    edit_weights(ckpt, lambda t: t.__setitem__("encoder.layers.1.mlp.up_proj.weight", torch.zeros(127, 64)))
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.mlp\.up_proj\.weight has shape \[127, 64\], expected \[128, 64\]"):
        load(ckpt)


def test_missing_and_unexpected_tensors_are_named(ckpt):
    edit_weights(ckpt, lambda t: t.pop("diffusion_head.weight"))
    with pytest.raises(CheckpointError, match="missing tensors diffusion_head.weight"):
        load(ckpt)


def test_unsupported_dtype_is_named(ckpt):
    edit_weights(ckpt, lambda t: t.__setitem__("encoder.norm.weight", torch.ones(64, dtype=torch.int8)))
    with pytest.raises(CheckpointError, match="encoder.norm.weight has dtype torch.int8"):
        load(ckpt)


def test_truncated_and_corrupted_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load(ckpt)


def test_pickled_weights_are_refused_not_loaded(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(CheckpointError, match="holds pickled weights \\(pytorch_model.bin\\).*never unpickles"):
        load(ckpt)


def test_missing_shard_is_named(tmp_path):
    d = make_tiny_checkpoint(tmp_path / "s", shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors"):
        load(d)


def test_unreadable_tokenizer(ckpt):
    (ckpt / "tokenizer.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not a readable tokenizer"):
        load(ckpt)
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json not found"):
        load(ckpt)


def test_bad_lora_adapter(ckpt):
    cfg = ckpt / "linear_spec_lora" / "adapter_config.json"
    acfg = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**acfg, "target_modules": ["q_proj", "o_proj"]}))
    with pytest.raises(CheckpointError, match="targets only o_proj"):
        load(ckpt)
    cfg.write_text(json.dumps({**acfg, "r": 8}))
    with pytest.raises(CheckpointError, match="lora_A.weight has shape"):
        load(ckpt)
    assert load(ckpt, lora=False).lora is None  # --no-lora never reads it


@pytest.mark.parametrize(
    "params,message",
    [
        (dict(mode="beam"), "unknown mode 'beam'"),
        (dict(block_length=0), "block_length must be an integer in \\[1, 128\\]"),
        (dict(block_length=129), "block_length must be an integer in \\[1, 128\\]"),
        (dict(threshold=1.5), "threshold must be a number in \\[0, 1\\]"),
        (dict(threshold=-0.1), "threshold must be a number in \\[0, 1\\]"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer in \\[1, 2147483647\\], got 0"),
        (dict(max_new_tokens=600), "needs .* KV-cache positions, more than the 512 available"),
        (dict(temperature=-1.0), "temperature must be"),
        (dict(max_thinking_tokens=5), "needs both max_thinking_tokens and end_think_token_id"),
        (dict(beam_width=4), "unknown generation parameter"),
    ],
)
def test_bad_generate_parameters_raise_clear_errors(tiny, params, message):
    with pytest.raises(GenerationError, match=message):
        tiny.generate([1, 5, 6], **{"mode": "linear_spec", **params})


@pytest.mark.parametrize("prompt,message", [("", "the prompt is empty"), ([], "no prompts"), ([1, 99999], "outside the vocabulary")])
def test_bad_prompts_raise_clear_errors(tiny, prompt, message):
    with pytest.raises(GenerationError, match=message):
        tiny.generate(prompt, chat=False)


def run_cli(*args):
    """The real entry point in a subprocess: what a user's shell sees."""
    return subprocess.run([sys.executable, "-m", "nld_trt.cli", *args], capture_output=True, text=True, timeout=120)


def run_main(capsys, *args) -> tuple[int, str]:
    """The same entry point in-process (fast): exit code and stderr."""
    from nld_trt.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--mode", "beam"], "Error: unknown mode 'beam'"),
        (["--block-length", "0", "--mode", "dlm"], "Error: block_length must be"),
        (["--threshold", "2"], "Error: threshold must be a number in [0, 1], got 2.0"),
        (["--max-new-tokens", "-3"], "Error: max_new_tokens must be an integer in [1, 2147483647], got -3"),
        (["--block-length", "abc"], "Error: Invalid value for '--block-length'"),
    ],
)
def test_cli_prints_one_line_and_exits_non_zero(tiny_dir, capsys, args, message):
    code, err = run_main(capsys, "generate", "--model", str(tiny_dir), *args, "hello")
    assert code != 0
    assert err.strip().splitlines() == [err.strip()] and err.startswith(message)


def test_cli_missing_model_directory(tmp_path):
    r = run_cli("generate", "--model", str(tmp_path / "nope"), "hi")
    assert r.returncode == 1 and r.stderr.strip() == f"Error: model directory {tmp_path / 'nope'} does not exist"
