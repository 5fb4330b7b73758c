"""`nld-trt quantize` of a vision-language checkpoint: the text backbone is quantized (calibrated on text and
image prompts), the vision tower and projector are kept unquantized, and the result reloads with greedy
linear_spec equal to greedy ar on image prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from nld_trt import load
from nld_trt.config import NLDConfig
from nld_trt.quant.calib_data import image_passes, synthetic_images
from nld_trt.tiny import make_tiny_vlm_checkpoint
from nld_trt.vision.config import VLMConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:modelopt")

INT4_SHAPES = dict(hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
SMALL = ["--calib-size", "8", "--calib-seq-len", "160", "--block-length", "8", "--image-mix", "0.5", "--eval-size",
         "2", "--max-new-tokens", "8"]


def picture(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


PROMPTS = [[{"role": "user", "content": [{"type": "image", "image": picture(90, 60, 1)},
                                         {"type": "text", "text": "What is it?"}]}],
           "A question without an image.",
           [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": picture(50, 80, 2)},
                                         {"type": "image", "image": picture(30, 30, 3)}]}]]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_vlm_checkpoint(tmp_path_factory.mktemp("qvlm") / "src", seed=6, std=0.08, **INT4_SHAPES)


@pytest.fixture(scope="module", params=["fp8", "int4_awq"])
def quantized(request, source, tmp_path_factory):
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")
    from click.testing import CliRunner

    from nld_trt.quant.cli import quantize_command

    out = tmp_path_factory.mktemp("qvlm") / request.param
    result = CliRunner().invoke(quantize_command, ["--model", str(source), "--qformat", request.param, "--output",
                                                   str(out), "--json", *SMALL])
    assert result.exit_code == 0, result.output
    return request.param, out, json.loads(result.stdout.strip().splitlines()[-1])


def test_the_backbone_is_quantized_and_the_vision_encoder_kept(quantized, source):
    qformat, out, report = quantized
    assert report["calibration"]["image_passes"] == 4 and report["calibration"]["passes"] == 8
    assert report["vision"]["quantized"] is False and "not given to ModelOpt" in report["vision"]["note"]
    config = NLDConfig.from_file(out)
    assert config.is_vlm and config.quantization_config["quant_algo"] == {"fp8": "FP8", "int4_awq": "W4A16_AWQ"}[qformat]
    vlm = VLMConfig.from_file(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert {n for n, f in index.items() if f == "model-vision.safetensors"} == set(vlm.vision_shapes())
    assert any(n.endswith("q_proj.weight_scale") for n in index)  # the text linears are quantized
    with safe_open(out / "model-vision.safetensors", "pt") as q, safe_open(source / "model.safetensors", "pt") as s:
        for name in vlm.vision_shapes():
            assert torch.equal(q.get_tensor(name), s.get_tensor(name))  # float32 here: the checkpoint's dtype


def test_a_quantized_vlm_reloads_and_keeps_greedy_linear_spec_equal_to_ar(quantized, source):
    _, out, _ = quantized
    nld = load(out, max_batch=2, max_seq_len=256)
    ar = nld.generate(PROMPTS, mode="ar", max_new_tokens=16, eos_token_ids=())
    for block in (4, 8):
        spec = nld.generate(PROMPTS, mode="linear_spec", block_length=block, max_new_tokens=16, eos_token_ids=())
        assert [s.token_ids for s in spec] == [a.token_ids for a in ar]
    # the vision encoder is the original's, bit for bit
    original = load(source, max_batch=1, max_seq_len=256)
    prompt = nld.prompts.encode(PROMPTS[2], local_files=False)
    for a, b in zip(nld.image_encoder.rows(list(prompt.pixels)), original.image_encoder.rows(list(prompt.pixels))):
        assert torch.equal(a, b)


def test_image_calibration_passes_carry_the_image_rows_at_the_pads():
    rows = torch.randn(6, 16)
    prompts = [([5, 18, 19, 19, 19, 20, 19, 19, 19, 21, 7], [2, 3, 4, 6, 7, 8], rows, [40, 41, 42, 11])]
    passes = image_passes(prompts, 4, 64, 0.5, 4, 100, lora=True, seed=1)
    assert [p.kind for p in passes] == ["causal", "causal", "draft", "draft"]
    for p in passes:
        assert p.embeds[0] == (2, 3, 4, 6, 7, 8) and torch.equal(p.embeds[1], rows)
        assert p.tokens[: 11] == tuple(prompts[0][0])
    draft = passes[2]
    assert draft.context >= 11 and draft.lora and draft.tokens[draft.context + 1:] == (100,) * 3


def test_synthetic_calibration_images_are_seeded_and_described():
    a, b = synthetic_images(3), synthetic_images(3)
    assert [r.answer for r in a] == [r.answer for r in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert all(r.answer.startswith("The image shows a") and r.answer.endswith("background.") for r in a)


def test_image_options_are_refused_for_a_text_checkpoint(tmp_path):
    from nld_trt.quant import QuantizationError
    from nld_trt.quant.pipeline import QuantizeOptions, quantize_checkpoint
    from nld_trt.tiny import make_tiny_checkpoint

    text = make_tiny_checkpoint(tmp_path / "t", seed=1, **INT4_SHAPES)
    with pytest.raises(QuantizationError, match="need a vision-language checkpoint"):
        quantize_checkpoint(QuantizeOptions(qformat="fp8", output=tmp_path / "o", model_dir=text, image_mix=0.3))
    assert not (tmp_path / "o").exists()
