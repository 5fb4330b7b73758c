"""The vision encoder is numerically transformers' PixtralVisionModel + Mistral3MultiModalProjector, and a VLM
checkpoint loads in either tensor spelling."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Mistral3Config, PixtralVisionModel
from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

from nld_trt.checkpoint import check_model_dir, load_vision_weights, load_weights
from nld_trt.errors import CheckpointError
from nld_trt.tiny import make_tiny_vlm_checkpoint, random_vision_tensors, tiny_vlm_config
from nld_trt.vision.config import VLMConfig, weight_spelling
from nld_trt.vision.tower import VisionEncoder, build_vision_encoder


def oracle(config: VLMConfig, tensors: dict[str, torch.Tensor]):
    """transformers' tower and projector holding the same weights."""
    tower = PixtralVisionModel(config.vision.to_transformers()).eval()
    tower.load_state_dict({k.removeprefix("encoder.vision_tower."): v for k, v in tensors.items()
                           if k.startswith("encoder.vision_tower.")}, strict=True)
    mistral3 = Mistral3Config(vision_config=config.vision.to_transformers(), text_config=config.text.to_transformers(),
                              spatial_merge_size=config.spatial_merge_size, vision_feature_layer=config.vision_feature_layer,
                              projector_hidden_act=config.projector_hidden_act,
                              multimodal_projector_bias=config.multimodal_projector_bias)
    projector = Mistral3MultiModalProjector(mistral3).eval()
    projector.load_state_dict({k.removeprefix("encoder.multi_modal_projector."): v for k, v in tensors.items()
                               if k.startswith("encoder.multi_modal_projector.")}, strict=True)
    return tower, projector


def oracle_rows(tower, projector, layer: int, images: list[torch.Tensor]) -> torch.Tensor:
    """transformers' path: pixel_values padded to one size, image_sizes, hidden state `layer`, projector."""
    h = max(i.shape[1] for i in images)
    w = max(i.shape[2] for i in images)
    batch = torch.zeros(len(images), 3, h, w)
    for n, img in enumerate(images):
        batch[n, :, : img.shape[1], : img.shape[2]] = img
    sizes = torch.tensor([list(img.shape[1:]) for img in images])
    with torch.no_grad():
        out = tower(batch, image_sizes=sizes, output_hidden_states=True)
        return projector(out.hidden_states[layer].squeeze(0), sizes)


@pytest.mark.parametrize("overrides", [dict(), dict(vision=dict(hidden_act="gelu", num_attention_heads=4, rope_theta=500.0),
                                                  projector_hidden_act="silu", multimodal_projector_bias=True,
                                                  vision_feature_layer=1)])
@pytest.mark.parametrize("sizes", [[(28, 28)], [(56, 84)], [(140, 84)], [(56, 84), (84, 28)], [(28, 56), (112, 56), (28, 28)]])
def test_tower_and_projector_match_transformers_pixtral_and_mistral3(overrides, sizes):
    overrides = dict(overrides)
    config = tiny_vlm_config(overrides.pop("vision", None))
    config = VLMConfig(**{**config.__dict__, **overrides})
    tensors = random_vision_tensors(config, seed=5, std=0.1)
    ours = build_vision_encoder(config, tensors, "cpu", torch.float32)
    tower, projector = oracle(config, tensors)
    g = torch.Generator().manual_seed(sum(h * w for h, w in sizes))
    images = [torch.randn(3, h, w, generator=g) for h, w in sizes]
    with torch.no_grad():
        batched = ours(images)
        singles = [ours([img])[0] for img in images]
    theirs = oracle_rows(tower, projector, config.vision_feature_layer, images)
    assert [r.shape for r in batched] == [((h // 28) * (w // 28), config.text.hidden_size) for h, w in sizes]
    mine = torch.cat(batched)
    assert (mine - theirs).abs().max().item() <= 1e-4
    assert mine.std().item() > 1e-2  # not vacuous: the rows vary
    # the block-diagonal mask keeps images apart: batched rows are the one-image rows
    for a, b in zip(batched, singles):
        assert (a - b).abs().max().item() <= 1e-5


def test_rotary_positions_and_the_block_mask_matter():
    """A tower without its 2D rotary or with images leaking into each other differs from the oracle."""
    config = tiny_vlm_config()
    tensors = random_vision_tensors(config, seed=2, std=0.1)
    ours = build_vision_encoder(config, tensors, "cpu", torch.float32)
    images = [torch.randn(3, 56, 84), torch.randn(3, 84, 56)]
    with torch.no_grad():
        good = torch.cat(ours(images))
        import nld_trt.vision.tower as tower_module

        saved = tower_module.block_diagonal_mask
        tower_module.block_diagonal_mask = lambda lengths, device: None
        try:
            leaky = torch.cat(ours(images))
        finally:
            tower_module.block_diagonal_mask = saved
    assert (good - leaky).abs().max().item() > 1e-3


def test_a_vlm_checkpoint_loads_in_both_tensor_spellings(tmp_path):
    release = make_tiny_vlm_checkpoint(tmp_path / "release", seed=1)
    llava = make_tiny_vlm_checkpoint(tmp_path / "llava", seed=1, spelling="llava")
    from safetensors import safe_open

    with safe_open(release / "model.safetensors", "pt") as f:
        assert weight_spelling(f.keys()) == "release"  # encoder.vision_tower.*, as the release stores them
    with safe_open(llava / "model.safetensors", "pt") as f:
        assert weight_spelling(f.keys()) == "llava"  # vision_tower.* / language_model.*
    for path in (release, llava):
        config = check_model_dir(path)
        assert config.is_vlm
    a, b = VLMConfig.from_file(release), VLMConfig.from_file(llava)
    for load in (lambda p, c: load_weights(p, c.text), load_vision_weights):
        ta, tb = load(release, a), load(llava, b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(k.startswith("encoder.vision_tower.transformer.layers.1.") for k in load_vision_weights(release, a))


def test_vlm_config_round_trips_and_reads_the_release_fields(tmp_path):
    config = tiny_vlm_config()
    raw = config.to_dict()
    assert raw["model_type"] == "nemotron_labs_diffusion_vlm"
    assert raw["architectures"] == ["NemotronLabsDiffusionVLMModel"]
    assert raw["vision_config"]["model_type"] == "pixtral" and raw["vision_config"]["rope_parameters"]["rope_theta"] == 10000.0
    assert "text_config" not in raw and raw["hidden_size"] == config.text.hidden_size  # text fields at the root
    assert VLMConfig.from_dict(raw) == config
    # the older Pixtral spelling: rope_theta at the vision config's root
    old = json.loads(json.dumps(raw))
    del old["vision_config"]["rope_parameters"]
    old["vision_config"]["rope_theta"] = 77.0
    assert VLMConfig.from_dict(old).vision.rope_theta == 77.0


@pytest.mark.parametrize("edit,message", [
    (lambda r: r.pop("vision_config"), "needs a vision_config"),
    (lambda r: r["vision_config"].update(model_type="siglip"), "pixtral"),
    (lambda r: r["vision_config"].update(hidden_act="relu"), "hidden_act"),
    (lambda r: r["vision_config"].update(head_dim=8), "head_dim"),
    (lambda r: r.update(vision_feature_layer=[-1, -2]), "list of layers"),
    (lambda r: r.update(vision_feature_layer=9), "vision_feature_layer"),
    (lambda r: r.update(projector_hidden_act="tanh"), "projector_hidden_act"),
    (lambda r: r.update(multimodal_projector_bias="no"), "multimodal_projector_bias"),
])
def test_bad_vlm_configs_are_refused_naming_the_field(edit, message):
    raw = tiny_vlm_config().to_dict()
    edit(raw)
    with pytest.raises(CheckpointError, match=message):
        VLMConfig.from_dict(raw)


def test_a_vlm_checkpoint_missing_its_tower_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_tiny_vlm_checkpoint(tmp_path / "v", seed=1)
    weights = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "vision_tower.transformer.layers.1." not in k},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensors encoder.vision_tower.transformer.layers.1"):
        check_model_dir(path)


def test_module_names_are_the_release_names_without_the_encoder_prefix():
    config = tiny_vlm_config()
    assert {"encoder." + k for k in VisionEncoder(config).state_dict()} == set(config.vision_shapes())


def test_info_shows_the_vision_tower(tiny_vlm_dir):
    from click.testing import CliRunner

    from nld_trt.cli import cli

    out = CliRunner().invoke(cli, ["info", "--model", str(tiny_vlm_dir), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["model_type"] == "nemotron_labs_diffusion_vlm"
    assert data["vision_tower"]["layers"] == 2 and data["vision_tower"]["hidden"] == 32
    assert data["vision_tower"]["pixels_per_image_token"] == 28
    assert data["parameters"] == VLMConfig.from_file(tiny_vlm_dir).text.num_parameters() + data["vision_tower"]["parameters"]


def test_a_batch_of_same_size_images_encodes_as_each_image_alone():
    """`forward_batch` (what training runs) gives each image's rows as `forward` of that image alone."""
    from nld_trt.vision.tower import VisionEncoder

    torch.manual_seed(0)
    config = tiny_vlm_config()
    encoder = VisionEncoder(config)
    for p in encoder.parameters():
        torch.nn.init.normal_(p, std=0.2)
    images = torch.randn(3, 3, 56, 84)
    batched = encoder.forward_batch(images)
    assert batched.shape == (3, 2 * 3, config.text.hidden_size)
    for image, rows in zip(images, batched):
        torch.testing.assert_close(rows, encoder([image])[0], rtol=1e-5, atol=1e-5)
