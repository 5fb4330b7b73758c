"""The draft adapter is applied exactly as PEFT applies it: adapters made with the real `peft` library on our
own model (rsLoRA, per-layer rank and alpha patterns with PEFT's key matching) give the same deltas and the
same draft pass as peft's forward; adapter options that would change the forward in ways we do not implement
are refused, naming the option in adapter_config.json."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model

from nld_trt import load
from nld_trt.checkpoint import LORA_DIR, load_lora
from nld_trt.errors import CheckpointError
from nld_trt.tiny import make_tiny_checkpoint

LAYERS = 4
VARIANTS = {
    "plain": {},
    "rslora": dict(use_rslora=True),
    "alpha_pattern": dict(alpha_pattern={"layers.1.self_attn.o_proj": 3, r"^encoder\.layers\.[23]\.self_attn\.o_proj": 40}),
    "rank_pattern": dict(rank_pattern={"layers.0.self_attn.o_proj": 2, "o_proj": 6}),  # first match wins
    "all": dict(use_rslora=True, rank_pattern={"encoder.layers.3.self_attn.o_proj": 8},
                alpha_pattern={"layers.2.self_attn.o_proj": 2.5}),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny checkpoint without an adapter, and its model."""
    d = make_tiny_checkpoint(tmp_path_factory.mktemp("peft") / "base", seed=3, std=0.15, lora_rank=None,
                             num_hidden_layers=LAYERS)
    return d, load(d, lora=False).model


def with_peft_adapter(base, tmp_path, **options):
    """peft's LoRA on a copy of our model's o_proj layers, saved as the checkpoint's linear_spec_lora/."""
    directory, model = base
    d = shutil.copytree(directory, tmp_path / "ckpt")
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], init_lora_weights=False, **options)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    peft_model.save_pretrained(d / LORA_DIR)
    return d, peft_model.base_model.model  # our NLDModel, its o_proj wrapped by peft


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_deltas_and_draft_pass_equal_peft_forward(base, tmp_path, variant):
    d, peft_model = with_peft_adapter(base, tmp_path, **VARIANTS[variant])
    nld = load(d, max_batch=1, max_seq_len=64)
    adapter = load_lora(d, nld.config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(LAYERS):
            theirs = peft_model.encoder.layers[i].self_attn.o_proj
            x = torch.randn(3, theirs.in_features, generator=g)
            ours = nld.model.encoder.layers[i].self_attn.lora.delta(x)
            torch.testing.assert_close(ours, theirs(x) - theirs.base_layer(x), rtol=1e-5, atol=1e-6)
            assert adapter.scale[i] == pytest.approx(theirs.scaling["default"], rel=1e-12), i
        t = 7
        tokens = torch.randint(0, 300, (1, t), generator=g)
        positions = torch.arange(t)[None]
        mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
        draft = nld.model(tokens, positions, mask, lora_rows=torch.ones(1, t, dtype=torch.bool))
        torch.testing.assert_close(draft, peft_model(tokens, positions, mask), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(draft, nld.model(tokens, positions, mask), atol=1e-3)  # the adapter matters


def edit_adapter_config(d, **changes):
    path = d / LORA_DIR / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(use_dora=True), "use_dora"),
        (dict(bias="lora_only"), "bias"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(modules_to_save=["diffusion_head"]), "modules_to_save"),
        (dict(init_lora_weights="pissa"), "init_lora_weights"),
        (dict(layer_replication=[[0, 2]]), "layer_replication"),
        (dict(alora_invocation_tokens=[5, 6]), "alora_invocation_tokens"),
        (dict(future_option={"x": 1}), "future_option"),
        (dict(layers_to_transform=[0, 1]), "layers_to_transform"),
        (dict(rank_pattern={"o_proj": 0}), "rank_pattern"),
        (dict(alpha_pattern={"(": 3}), "alpha_pattern"),
        (dict(use_rslora="yes"), "use_rslora"),
        (dict(peft_type="LOHA"), "peft_type"),
    ],
)
def test_options_that_change_the_forward_are_refused_by_name(base, tmp_path, changes, message):
    d, _ = with_peft_adapter(base, tmp_path)
    edit_adapter_config(d, **changes)
    with pytest.raises(CheckpointError, match=rf"adapter_config.json: .*{message}"):
        load(d)


def test_a_rank_that_disagrees_with_the_tensors_names_the_adapter_config(base, tmp_path):
    d, _ = with_peft_adapter(base, tmp_path, rank_pattern={"layers.1.self_attn.o_proj": 2})
    edit_adapter_config(d, rank_pattern={})
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.o_proj\.lora_A\.weight has shape \[2, 64\], "
                                              r"expected \[4, 64\] from adapter_config\.json"):
        load(d)
