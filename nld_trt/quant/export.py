"""ModelOpt's unified Hugging Face export, in NLD's release layout.

`export_hf_checkpoint` writes `hf_quant_config.json`, the `quantization_config` of config.json and the
quantized tensors (FP8 `weight` + `weight_scale` + `input_scale`; INT4 packed `weight` + group
`weight_scale` + `pre_quant_scale`; `k_proj.k_scale` / `v_proj.v_scale`) under NLD's own names. It changes
the model in place (weights become packed), so it runs last on a calibrated model. The original
config.json is kept field for field (rope parameters, remote-code entries) apart from the dtype.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..checkpoint import LORA_DIR
from .calibrate import CalibrationModel, quiet

WEIGHT_FILES = re.compile(r"^(model.*\.safetensors|model\.safetensors\.index\.json|pytorch_model.*\.bin|.*\.pt)$")
NOT_COPIED = {"config.json", "hf_quant_config.json", "quantization_report.json"}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def add_tensors(directory: Path, tensors: dict[str, torch.Tensor], filename: str) -> None:
    """Add unquantized tensors (a VLM's vision tower and projector) to an exported checkpoint as their own
    file, listed with the export's own tensors in model.safetensors.index.json."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
    else:
        with safe_open(directory / "model.safetensors", framework="pt") as f:
            index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in f.keys()}}
    clash = set(tensors) & set(index["weight_map"])
    if clash:
        raise ValueError(f"tensors already exported: {sorted(clash)[:3]}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / filename),
              metadata={"format": "pt"})
    index["weight_map"].update({name: filename for name in tensors})
    total = index["metadata"].get("total_size")
    if isinstance(total, int):
        index["metadata"]["total_size"] = total + sum(t.numel() * t.element_size() for t in tensors.values())
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def export_config(raw_config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The original config.json for the quantized checkpoint: same fields, export dtype, no old quant info."""
    cfg = {k: v for k, v in raw_config.items() if k != "quantization_config"}
    cfg.setdefault("architectures", ["NemotronLabsDiffusionModel"])
    cfg["torch_dtype"] = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if "dtype" in cfg:  # transformers >= 5 spelling
        cfg["dtype"] = cfg["torch_dtype"]
    return cfg


def _hf_view(model: CalibrationModel, cfg: dict[str, Any]) -> None:
    """ModelOpt reads (and sets flags on) a Hugging Face config at model.config: give it a mutable one."""
    model.export_config = cfg
    dtype = getattr(torch, cfg["torch_dtype"], None)
    model.config = SimpleNamespace(**{**cfg, "torch_dtype": dtype, "dtype": dtype})


def resmoothed_copy(model: CalibrationModel, raw_config: dict[str, Any]) -> CalibrationModel:
    """A copy of a calibrated INT4 AWQ model after the re-smoothing export applies (one pre_quant_scale per
    group of linears sharing an input, folded into the RMSNorm): the fake-quant model the export encodes."""
    import copy

    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    twin = copy.deepcopy(model)
    nld_config = twin.config
    _hf_view(twin, export_config(raw_config, next(twin.parameters()).dtype))
    with quiet():
        requantize_resmooth_fused_llm_layers(twin)
    twin.config = nld_config
    return twin


def export_checkpoint(
    model: CalibrationModel,
    directory: Path,
    raw_config: dict[str, Any],
    dtype: torch.dtype,
    max_shard_size: int | str = "5GB",
) -> None:
    """Run ModelOpt's unified HF export of the calibrated `model` into the existing `directory`."""
    from modelopt.torch.export import export_hf_checkpoint

    model.export_dtype = dtype
    model.float_names = frozenset(model.config.expected_shapes())
    _hf_view(model, export_config(raw_config, dtype))
    with quiet():
        export_hf_checkpoint(model, dtype=dtype, export_dir=directory, max_shard_size=max_shard_size)


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Tokenizer, chat template, generation config, README... and the linear_spec_lora/ adapter."""
    copied = []
    for p in sorted(source.iterdir()):
        if p.is_file() and p.name not in NOT_COPIED and not WEIGHT_FILES.match(p.name):
            shutil.copy2(p, target / p.name)
            copied.append(p.name)
    if (source / LORA_DIR).is_dir():
        shutil.copytree(source / LORA_DIR, target / LORA_DIR)
        copied.append(LORA_DIR + "/")
    return copied
