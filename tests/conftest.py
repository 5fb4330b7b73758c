"""Shared fixtures: tiny random NLD checkpoints in the release layout, built once per session."""

from __future__ import annotations

import pytest
import torch

from nld_trt.tiny import make_tiny_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def calibration_cache(tmp_path_factory):
    """auto's pass-cost calibrations go to a test directory, not the user's cache (servers inherit it)."""
    import os

    os.environ["NLD_TRT_CACHE"] = str(tmp_path_factory.mktemp("nld-trt-cache"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """llada-style tiny model with a LoRA drafter, YaRN and the llama-4 query scale from position 64."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-a", seed=0, std=0.15)


@pytest.fixture(scope="session")
def tiny_dir_b(tmp_path_factory):
    """A second, differently shaped random model: GQA ratio 4, three layers, dream logit alignment."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny-b", seed=7, std=0.15, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, num_hidden_layers=3, dlm_type="dream", lora_rank=2,
    )


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from nld_trt import load

    return load(tiny_dir, max_batch=4, max_seq_len=512)


@pytest.fixture(scope="session")
def tiny_b(tiny_dir_b):
    from nld_trt import load

    return load(tiny_dir_b, max_batch=4, max_seq_len=512)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A random tiny Nemotron-Labs-Diffusion-VLM in the release layout (tower width 32, two layers)."""
    from nld_trt.tiny import make_tiny_vlm_checkpoint

    return make_tiny_vlm_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-vlm", seed=3, std=0.15)


@pytest.fixture(scope="session")
def tiny_vlm(tiny_vlm_dir):
    from nld_trt import load

    return load(tiny_vlm_dir, max_batch=4, max_seq_len=512)
