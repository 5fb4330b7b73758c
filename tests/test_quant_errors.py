"""Bad quantization requests and damaged quantized checkpoints fail with one clear message and write nothing.

The request errors are raised before any calibration, so these tests are fast and need no ModelOpt. The
loader is exercised on FP8 / INT4 checkpoints made by hand (the format is simple), then damaged.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nld_trt.config import NLDConfig
from nld_trt.errors import CheckpointError
from nld_trt.quant import QuantizationError
from nld_trt.quant.linear import unpack_int4
from nld_trt.quant.loader import linear_shapes, load_quantized_model
from nld_trt.quant.pipeline import QuantizeOptions, quantize_checkpoint
from nld_trt.tiny import make_tiny_checkpoint

INT4_SHAPES = dict(hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qerr") / "src", seed=1, std=0.1, **INT4_SHAPES)


def run(src, tmp_path, **kw):
    opts = dict(qformat="fp8", output=tmp_path / "out", model_dir=src)
    opts.update(kw)
    with pytest.raises(QuantizationError) as e:
        quantize_checkpoint(QuantizeOptions(**opts))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "data.jsonl") == [], "something was written"
    return str(e.value)


def jsonl(tmp_path, text: str):
    p = tmp_path / "data.jsonl"
    p.write_text(text)
    return p


def test_unknown_qformat(src, tmp_path):
    assert "unknown qformat 'int3': choose one of fp8, int4_awq" in run(src, tmp_path, qformat="int3")


def test_calibration_file_missing(src, tmp_path):
    msg = run(src, tmp_path, calib_data=tmp_path / "nope.jsonl")
    assert msg.startswith("calibration file") and msg.endswith("nope.jsonl not found")


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty: it needs one JSON object per line"),
        ("\n  \n", "is empty"),
        ('{"text": "fine"}\n{"text": oops}\n', "data.jsonl:2: not valid JSON"),
        ('["a", "b"]\n', "data.jsonl:1: each line must be a JSON object, found list"),
        ('{"prompt": "x"}\n', "data.jsonl:1: needs a `text` field, or both `question` and `answer`"),
        ('{"question": "q"}\n', "needs a `text` field, or both `question` and `answer`"),
        ('{"text": 42}\n', "data.jsonl:1: `text` must be a non-empty string, found 42"),
        ('{"text": "  "}\n', "`text` must be a non-empty string"),
    ],
)
def test_calibration_file_empty_or_malformed(src, tmp_path, content, message):
    assert message in run(src, tmp_path, calib_data=jsonl(tmp_path, content))


def test_dimensions_incompatible_with_the_int4_group_size(tmp_path, tmp_path_factory):
    small = make_tiny_checkpoint(tmp_path_factory.mktemp("qerr") / "small", seed=0)  # hidden 64, intermediate 128
    msg = run(small, tmp_path, qformat="int4_awq")
    assert "groups of 128 inputs" in msg and "q_proj [64 x 64]" in msg and "hidden_size 64" in msg
    assert "Use --qformat fp8" in msg


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(block_mix=1.5), "--block-mix must be a number in [0, 1]"),
        (dict(calib_size=0), "--calib-size must be a positive integer"),
        (dict(kv_cache_dtype="int8"), "unknown --kv-cache-dtype 'int8'"),
        (dict(calib_seq_len=8, block_length=8), "leaves no room for a context"),
    ],
)
def test_bad_parameters(src, tmp_path, kw, message):
    assert message in run(src, tmp_path, **kw)


def test_existing_output_and_same_directory(src, tmp_path):
    assert "--output must differ from --model" in run(src, tmp_path, output=src)
    (tmp_path / "out").mkdir()
    with pytest.raises(QuantizationError, match="already exists"):
        quantize_checkpoint(QuantizeOptions(qformat="fp8", output=tmp_path / "out", model_dir=src))
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_prints_one_line_and_exits_1(src, tmp_path, capsys):
    from nld_trt.quant.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(src), "--qformat", "nvfp4", "--output", str(tmp_path / "o")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["Error: unknown qformat 'nvfp4': choose one of fp8, int4_awq"]
    assert not (tmp_path / "o").exists()


# the loader, on hand-made checkpoints ---------------------------------------------------------------
def fp8_checkpoint(src, out, kv=True):
    """An FP8 checkpoint in ModelOpt's unified layout, made directly (per-tensor scales = amax / 448)."""
    shutil.copytree(src, out)
    config = NLDConfig.from_file(out)
    tensors = load_file(out / "model.safetensors")
    for module in linear_shapes(config):
        if module == "diffusion_head":
            continue
        w = tensors[module + ".weight"]
        scale = w.abs().max() / 448
        tensors[module + ".weight"] = (w / scale).to(torch.float8_e4m3fn)
        tensors[module + ".weight_scale"] = scale.reshape(())
        tensors[module + ".input_scale"] = torch.tensor(0.02)
    for i in range(config.num_hidden_layers):
        if kv:
            tensors[f"encoder.layers.{i}.self_attn.k_proj.k_scale"] = torch.tensor(0.01)
            tensors[f"encoder.layers.{i}.self_attn.v_proj.v_scale"] = torch.tensor(0.01)
    save_file(tensors, out / "model.safetensors")
    hf = {
        "producer": {"name": "modelopt"},
        "quantization": {
            "quant_algo": "FP8",
            "kv_cache_quant_algo": "FP8" if kv else None,
            "exclude_modules": ["diffusion_head", "encoder.embed_tokens"],
        },
    }
    (out / "hf_quant_config.json").write_text(json.dumps(hf))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "modelopt",
        "quant_algo": "FP8",
        "ignore": hf["quantization"]["exclude_modules"],
    }
    (out / "config.json").write_text(json.dumps(cfg))
    return out, config


def test_fp8_loader_executes_exact_dequantization(src, tmp_path):
    out, _ = fp8_checkpoint(src, tmp_path / "fp8")
    config = NLDConfig.from_file(out)
    model = load_quantized_model(out, config)
    t = load_file(out / "model.safetensors")
    lin = model.encoder.layers[0].mlp.up_proj
    x = torch.randn(3, 128) * 0.05
    xq = (x / 0.02).clamp(-448, 448).to(torch.float8_e4m3fn).float() * 0.02
    w = t["encoder.layers.0.mlp.up_proj.weight"].float() * t["encoder.layers.0.mlp.up_proj.weight_scale"]
    assert torch.allclose(lin(x), xq @ w.T, atol=1e-6)
    assert float(model.encoder.layers[1].self_attn.kv_quant.k_scale) == pytest.approx(0.01)


def test_int4_unpack_is_modelopt_packing():
    w = torch.randint(-8, 8, (6, 4), dtype=torch.int8)
    low, high = w[0::2] & 0x0F, w[1::2] & 0x0F  # ModelOpt: row 2k in the low nibble, 2k+1 in the high one
    packed = (low | (high << 4)).to(torch.uint8)
    assert torch.equal(unpack_int4(packed), w)


def damage(path, name, value=None, drop=False):
    t = load_file(path / "model.safetensors")
    if drop:
        del t[name]
    else:
        t[name] = value
    save_file(t, path / "model.safetensors")


@pytest.mark.parametrize(
    "name, value, drop, message",
    [
        (
            "encoder.layers.0.self_attn.q_proj.weight_scale",
            None,
            True,
            "missing tensors encoder.layers.0.self_attn.q_proj.weight_scale",
        ),
        (
            "encoder.layers.1.mlp.gate_proj.weight",
            torch.zeros(256, 128),
            False,
            "gate_proj.weight has shape [256, 128] and dtype torch.float32, expected float8_e4m3fn",
        ),
        (
            "encoder.layers.0.mlp.down_proj.input_scale",
            torch.tensor(-1.0),
            False,
            "scale encoder.layers.0.mlp.down_proj.input_scale holds non-positive",
        ),
        ("encoder.layers.0.mlp.down_proj.input_scale", torch.ones(2), False, "expected one float32 scale"),
        (
            "encoder.layers.1.self_attn.v_proj.v_scale",
            None,
            True,
            "missing tensors encoder.layers.1.self_attn.v_proj.v_scale",
        ),
        (
            "encoder.layers.0.self_attn.q_proj.pre_quant_scale",
            torch.ones(128),
            False,
            "unexpected tensors encoder.layers.0.self_attn.q_proj.pre_quant_scale",
        ),
    ],
)
def test_loader_names_the_bad_tensor(src, tmp_path, name, value, drop, message):
    out, _ = fp8_checkpoint(src, tmp_path / "bad")
    damage(out, name, value, drop)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_quantized_model(out, NLDConfig.from_file(out))


def test_loader_rejects_unsupported_formats_and_int4_shapes(src, tmp_path):
    out, _ = fp8_checkpoint(src, tmp_path / "nvfp4", kv=False)
    hf = json.loads((out / "hf_quant_config.json").read_text())
    hf["quantization"]["quant_algo"] = "NVFP4"
    (out / "hf_quant_config.json").write_text(json.dumps(hf))
    with pytest.raises(
        CheckpointError, match="quant_algo 'NVFP4' is not supported; this runtime executes FP8, W4A16_AWQ"
    ):
        load_quantized_model(out, NLDConfig.from_file(out))
    hf["quantization"].update(quant_algo="W4A16_AWQ", group_size=128)
    (out / "hf_quant_config.json").write_text(json.dumps(hf))
    t = load_file(out / "model.safetensors")
    config = NLDConfig.from_file(out)
    for module, (o, i) in linear_shapes(config).items():
        if module != "diffusion_head":
            t[module + ".weight"] = torch.zeros(o // 2, i, dtype=torch.uint8)
            t[module + ".weight_scale"] = torch.ones(o, i // 128)
            del t[module + ".input_scale"]
    t["encoder.layers.0.mlp.down_proj.weight_scale"] = torch.ones(128, 4)  # 256 inputs / 4 = group 64
    save_file(t, out / "model.safetensors")
    with pytest.raises(
        CheckpointError, match="down_proj.weight_scale implies group size 64, hf_quant_config.json says 128"
    ):
        load_quantized_model(out, config)
