"""Quantization recipes: `quantize/<qformat>.json` turned into a ModelOpt quantization config.

The recipe files are data (base ModelOpt config, INT4 group size, calibration defaults, acceptance gates), so
a new format or a changed tolerance needs no code. They are read from the installed `nld_trt.recipes`
package when pyproject maps `quantize/` there, else from the source checkout.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import QuantizationError

LM_HEAD = "diffusion_head"
KV_CACHE_DTYPES = ("fp8",)


@dataclass(frozen=True)
class Recipe:
    qformat: str
    description: str
    modelopt_config: str  # attribute of modelopt.torch.quantization, e.g. "FP8_DEFAULT_CFG"
    group_size: int | None  # INT4 block along the input dimension; None for per-tensor formats
    calib_size: int
    calib_seq_len: int
    block_mix: float
    tpf_drop: float  # relative TPF drop tolerated in dlm and linear_spec (0.02 = 2%)
    accuracy_drop_points: float


def recipe_dir() -> Path:
    try:
        from importlib.resources import files

        installed = Path(str(files("nld_trt.recipes")))
        if installed.is_dir():
            return installed
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "quantize"


def available_qformats() -> list[str]:
    d = recipe_dir()
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def load_recipe(qformat: str) -> Recipe:
    """The recipe of `qformat`; an unknown name lists the known ones."""
    known = available_qformats()
    if not isinstance(qformat, str) or qformat not in known:
        hint = ", ".join(known) if known else f"none found in {recipe_dir()}"
        raise QuantizationError(f"unknown qformat {qformat!r}: choose one of {hint}")
    path = recipe_dir() / f"{qformat}.json"
    try:
        raw = json.loads(path.read_text())
        calib, gates = raw["calibration"], raw["gates"]
        recipe = Recipe(
            qformat=raw["qformat"],
            description=raw.get("description", ""),
            modelopt_config=raw["modelopt_config"],
            group_size=raw.get("group_size"),
            calib_size=int(calib["size"]),
            calib_seq_len=int(calib["seq_len"]),
            block_mix=float(calib["block_mix"]),
            tpf_drop=float(gates["tpf_drop"]),
            accuracy_drop_points=float(gates["accuracy_drop_points"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise QuantizationError(f"recipe {path} is malformed ({e!r})") from None
    if recipe.qformat != qformat:
        raise QuantizationError(f"recipe {path} names qformat {recipe.qformat!r}, expected {qformat!r}")
    return recipe


def modelopt_config(recipe: Recipe, quantize_lm_head: bool = False, kv_cache_dtype: str | None = None) -> dict:
    """The ModelOpt config: the recipe's base, its group size, the LM-head rule and the KV-cache quantizers."""
    import modelopt.torch.quantization as mtq

    base = getattr(mtq, recipe.modelopt_config, None)
    if not isinstance(base, dict):
        raise QuantizationError(
            f"recipe {recipe.qformat}: modelopt has no config {recipe.modelopt_config!r} "
            "(check the nvidia-modelopt version)"
        )
    cfg = copy.deepcopy(base)
    entries: list[dict[str, Any]] = cfg["quant_cfg"]
    if recipe.group_size is not None:
        for e in entries:
            block = (e.get("cfg") or {}).get("block_sizes") if isinstance(e.get("cfg"), dict) else None
            if block is not None and -1 in block:
                block[-1] = recipe.group_size
    # The head is excluded by name in ModelOpt's defaults only as lm_head/output: NLD's is diffusion_head.
    if not quantize_lm_head:
        entries.append({"quantizer_name": f"*{LM_HEAD}*", "enable": False})
    if kv_cache_dtype is not None:
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise QuantizationError(
                f"unknown kv-cache dtype {kv_cache_dtype!r}: choose one of {', '.join(KV_CACHE_DTYPES)}"
            )
        entries.extend(copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"]))
    return cfg
