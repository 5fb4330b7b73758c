"""Loading a ModelOpt unified Hugging Face checkpoint (FP8 or INT4 AWQ) of NLD into the one model definition.

The float tensors load as usual; each quantized linear becomes an `FP8Linear` / `Int4AWQLinear` holding the
checkpoint's own tensors; FP8 KV-cache scales become a per-layer K/V fake quantizer. Every tensor is checked
(name, shape, dtype, finite, positive scales) against config.json and hf_quant_config.json first, so a
damaged or mismatched checkpoint fails with the tensor's name.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import check_names, check_tensor, read_tensors, weight_files
from ..vision.config import VLMConfig
from ..config import NLDConfig
from ..errors import CheckpointError
from ..model import NLDModel, Rotary
from .kv import FP8KVQuant, attach_kv_quant
from .linear import FP8Linear, Int4AWQLinear

QUANT_ALGOS = {"FP8": "fp8", "W4A16_AWQ": "int4_awq"}
KV_ALGOS = ("FP8",)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class QuantSpec:
    """What hf_quant_config.json says: the algorithm, the KV-cache format, the group size, the exclusions."""

    quant_algo: str
    kv_cache_quant_algo: str | None
    group_size: int | None
    exclude_modules: tuple[str, ...]

    @property
    def qformat(self) -> str:
        return QUANT_ALGOS[self.quant_algo]

    def is_quantized(self, module: str) -> bool:
        return not any(fnmatch.fnmatchcase(module, pattern) for pattern in self.exclude_modules)


def read_quant_spec(directory: str | Path, config: NLDConfig) -> QuantSpec:
    """hf_quant_config.json (ModelOpt's own file) or, without it, config.json's quantization_config."""
    path = Path(directory) / "hf_quant_config.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_text())["quantization"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path} is not a valid ModelOpt quantization config ({e!r})") from None
        exclude = raw.get("exclude_modules") or []
    else:
        raw = config.quantization_config or {}
        exclude = raw.get("ignore") or raw.get("exclude_modules") or []
        path = Path(directory) / "config.json"
    algo, kv = raw.get("quant_algo"), raw.get("kv_cache_quant_algo")
    if algo not in QUANT_ALGOS:
        raise CheckpointError(
            f"{path}: quant_algo {algo!r} is not supported; this runtime executes {', '.join(QUANT_ALGOS)} "
            "(ModelOpt unified checkpoints from `nld-trt quantize`)"
        )
    if kv is not None and kv not in KV_ALGOS:
        raise CheckpointError(f"{path}: kv_cache_quant_algo {kv!r} is not supported (only {', '.join(KV_ALGOS)})")
    group = raw.get("group_size")
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise CheckpointError(f"{path}: group_size must be a positive integer, found {group!r}")
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        raise CheckpointError(f"{path}: the excluded module list must be a list of names")
    return QuantSpec(algo, kv, group, tuple(exclude))


def linear_shapes(config: NLDConfig) -> dict[str, tuple[int, int]]:
    """Every linear module of the model and its weight shape [out, in]."""
    shapes = config.expected_shapes()
    names = [f"encoder.layers.{i}.{m}" for i in range(config.num_hidden_layers) for m in LINEARS]
    names.append("diffusion_head")
    return {n: shapes[n + ".weight"] for n in names}


def _scalar(t: torch.Tensor) -> bool:
    return t.numel() == 1


def _fail(where: str, name: str, t: torch.Tensor, want: str) -> CheckpointError:
    return CheckpointError(f"{where}: tensor {name} has shape {list(t.shape)} and dtype {t.dtype}, expected {want}")


def _check_scale(where: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where}: scale {name} has dtype {t.dtype}, expected a float")
    if not torch.isfinite(t).all() or not (t > 0).all():
        raise CheckpointError(f"{where}: scale {name} holds non-positive, NaN or infinite values; the file is damaged")


def _check_quant_linear(
    where: str, spec: QuantSpec, module: str, shape: tuple[int, int], tensors: dict[str, torch.Tensor]
) -> int | None:
    """Validate one quantized linear's tensors; returns the INT4 group size (None for FP8)."""
    out, inp = shape
    w, s = tensors[module + ".weight"], tensors[module + ".weight_scale"]
    if spec.quant_algo == "FP8":
        if w.dtype != torch.float8_e4m3fn or tuple(w.shape) != (out, inp):
            raise _fail(where, module + ".weight", w, f"float8_e4m3fn {[out, inp]}")
        if not torch.isfinite(w.float()).all():
            raise CheckpointError(f"{where}: tensor {module}.weight holds NaN values; the file is damaged")
        for name in (".weight_scale", ".input_scale"):
            t = tensors[module + name]
            if not _scalar(t):
                raise _fail(where, module + name, t, "one float32 scale")
            _check_scale(where, module + name, t)
        return None
    if w.dtype != torch.uint8 or tuple(w.shape) != (out // 2, inp) or out % 2:
        raise _fail(where, module + ".weight", w, f"uint8 {[out // 2, inp]} (two int4 values per byte)")
    if s.dim() != 2 or s.shape[0] != out or s.shape[1] < 1 or inp % s.shape[1]:
        raise _fail(where, module + ".weight_scale", s, f"[{out}, {inp} / group_size]")
    group = inp // s.shape[1]
    if spec.group_size is not None and group != spec.group_size:
        raise CheckpointError(
            f"{where}: {module}.weight_scale implies group size {group}, hf_quant_config.json says {spec.group_size}"
        )
    _check_scale(where, module + ".weight_scale", s)
    pqs = tensors.get(module + ".pre_quant_scale")
    if pqs is not None:
        if tuple(pqs.shape) != (inp,):
            raise _fail(where, module + ".pre_quant_scale", pqs, f"[{inp}]")
        _check_scale(where, module + ".pre_quant_scale", pqs)
    return group


def expected_names(config: NLDConfig, spec: QuantSpec, present: set[str]) -> set[str]:
    """The tensor names a checkpoint of this config and spec must hold (optional ones if present)."""
    names = set(config.expected_shapes())
    for module in linear_shapes(config):
        if not spec.is_quantized(module):
            continue
        names.add(module + ".weight_scale")
        if spec.quant_algo == "FP8":
            names.add(module + ".input_scale")
        elif module + ".pre_quant_scale" in present:
            names.add(module + ".pre_quant_scale")
    if spec.kv_cache_quant_algo is not None:
        for i in range(config.num_hidden_layers):
            names |= {f"encoder.layers.{i}.self_attn.k_proj.k_scale", f"encoder.layers.{i}.self_attn.v_proj.v_scale"}
    return names


def read_quantized_tensors(directory: str | Path, config: NLDConfig, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Every tensor of a quantized checkpoint, validated."""
    directory = Path(directory)
    where = str(directory)
    files = weight_files(directory)
    expected = expected_names(config, spec, set(files))
    hint = "do config.json and hf_quant_config.json match the weights?"
    # a VLM's tower and projector stay unquantized beside the text tensors: checked here, read by the runtime
    vision = set(VLMConfig.from_file(directory).vision_shapes()) if config.is_vlm else set()
    check_names(where, expected | vision, set(files), f"for a {spec.quant_algo} checkpoint; {hint}",
                f"for a {spec.quant_algo} checkpoint; {hint}")
    tensors = read_tensors(files, sorted(expected))
    linears = linear_shapes(config)
    quantized = {m for m in linears if spec.is_quantized(m)}
    for name, shape in config.expected_shapes().items():
        if name.removesuffix(".weight") not in quantized:
            check_tensor(name, tensors[name], shape, where)
    for module in sorted(quantized):
        _check_quant_linear(where, spec, module, linears[module], tensors)
    for name in expected:
        if name.endswith((".k_scale", ".v_scale")):
            if not _scalar(tensors[name]):
                raise _fail(where, name, tensors[name], "one float32 scale")
            _check_scale(where, name, tensors[name])
    return tensors


def _quantized_module(
    spec: QuantSpec, shape: tuple[int, int], tensors: dict[str, torch.Tensor], module: str
) -> nn.Module:
    out, inp = shape
    if spec.quant_algo == "FP8":
        return FP8Linear(inp, out)
    scale = tensors[module + ".weight_scale"]
    return Int4AWQLinear(inp, out, inp // scale.shape[1], module + ".pre_quant_scale" in tensors, scale.dtype)


def load_quantized_model(
    path: str | Path, config: NLDConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> NLDModel:
    """The NLD model of a quantized checkpoint: float tensors in `dtype`, quantized ones as stored."""
    spec = read_quant_spec(path, config)
    tensors = read_quantized_tensors(path, config, spec)
    with torch.device("meta"):
        model = NLDModel(config)
        for module, shape in linear_shapes(config).items():
            if spec.is_quantized(module):
                parent, _, attr = module.rpartition(".")
                setattr(
                    model.get_submodule(parent) if parent else model,
                    attr,
                    _quantized_module(spec, shape, tensors, module),
                )
    kv_names = {n for n in tensors if n.endswith((".k_scale", ".v_scale"))}
    state: dict[str, Any] = {}
    for name, t in tensors.items():
        if name in kv_names:
            continue
        if spec.quant_algo == "FP8" and name.endswith((".weight_scale", ".input_scale")):
            t = t.reshape(())  # ModelOpt writes 0-d scales; accept [1] as well
        float_tensor = name in config.expected_shapes() and t.dtype in FLOAT_DTYPES
        state[name] = t.to(device=device, dtype=dtype) if float_tensor else t.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary = Rotary(config).to(device)
    if spec.kv_cache_quant_algo is not None:
        for i, layer in enumerate(model.encoder.layers):
            p = f"encoder.layers.{i}.self_attn."
            attach_kv_quant(
                layer.self_attn, FP8KVQuant(tensors[p + "k_proj.k_scale"], tensors[p + "v_proj.v_scale"]).to(device)
            )
    return model.eval()
