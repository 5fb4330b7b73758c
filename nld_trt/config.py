"""The NLD configuration: `config.json` of a Hugging Face checkpoint, parsed and validated.

We read the file ourselves (never the checkpoint's remote code). The backbone fields are exactly those of
transformers' Ministral 3, so `to_transformers()` hands the same numbers to transformers wherever we reuse
its code (the YaRN rotary frequencies, the parity oracle).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

DEFAULT_PAGE_SIZE = 16  # KV-cache positions per page (nld_trt/kv); here so that the CLI reads it without torch

VLM_MODEL_TYPE = "nemotron_labs_diffusion_vlm"  # the vision-language release: these text fields + a vision tower
MODEL_TYPES = ("nemotron_labs_diffusion", "ministral_dlm", VLM_MODEL_TYPE)
DLM_TYPES = ("llada", "dream")
ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalized from `rope_parameters` / `rope_scaling` / `rope_theta`."""

    rope_type: str = "default"
    rope_theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool | None = None
    # Ministral 3: queries at position p are scaled by 1 + beta * log(1 + floor(p / original_max)).
    llama_4_scaling_beta: float = 0.0

    def as_rope_parameters(self) -> dict[str, Any]:
        """The `rope_parameters` dict in transformers' spelling (None entries dropped)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class NLDConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mask_token_id: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    block_size: int = 32
    dlm_type: str = "llada"
    model_type: str = "nemotron_labs_diffusion"
    torch_dtype: str = "bfloat16"
    quantization_config: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------------------
    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def is_vlm(self) -> bool:
        """A vision-language checkpoint: this is its text model; nld_trt.vision.VLMConfig reads the rest."""
        return self.model_type == VLM_MODEL_TYPE

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def num_parameters(self, with_lm_head: bool = True) -> int:
        h, d = self.hidden_size, self.head_dim
        q = self.num_attention_heads * d
        kv = self.num_key_value_heads * d
        per_layer = 2 * h + h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size
        total = self.vocab_size * h + self.num_hidden_layers * per_layer + h
        return total + (self.vocab_size * h if with_lm_head else 0)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the release layout and its shape (linear weights are [out, in])."""
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        q = self.num_attention_heads * d
        kv = self.num_key_value_heads * d
        shapes: dict[str, tuple[int, ...]] = {"encoder.embed_tokens.weight": (self.vocab_size, h)}
        for n in range(self.num_hidden_layers):
            p = f"encoder.layers.{n}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "self_attn.q_proj.weight"] = (q, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, q)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "mlp.gate_proj.weight"] = (i, h)
            shapes[p + "mlp.up_proj.weight"] = (i, h)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes["encoder.norm.weight"] = (h,)
        shapes["diffusion_head.weight"] = (self.vocab_size, h)
        return shapes

    def to_transformers(self):
        """The equivalent `transformers.Ministral3Config` (backbone only)."""
        from transformers import Ministral3Config

        return Ministral3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=False,
            rope_parameters=self.rope.as_rope_parameters(),
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` content in the release layout."""
        d: dict[str, Any] = {
            "architectures": ["NemotronLabsDiffusionModel"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": self.rope.as_rope_parameters(),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "mask_token_id": self.mask_token_id,
            "block_size": self.block_size,
            "dlm_type": self.dlm_type,
            "torch_dtype": self.torch_dtype,
        }
        if self.quantization_config is not None:
            d["quantization_config"] = self.quantization_config
        return d

    def save(self, directory: str | Path) -> None:
        (Path(directory) / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> NLDConfig:
        return _parse(raw, source)

    @classmethod
    def from_file(cls, path: str | Path) -> NLDConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise CheckpointError(
                f"{path} not found: an NLD checkpoint directory needs its config.json "
                "(download the whole Hugging Face repository, not only the weights)"
            )
        from .fileutil import read_json_object

        return _parse(read_json_object(path, CheckpointError, "; re-download it"), str(path))


def _parse(raw: dict[str, Any], source: str) -> NLDConfig:
    def fail(msg: str) -> CheckpointError:
        return CheckpointError(f"{source}: {msg}")

    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise fail(f"model_type is {model_type!r}; expected one of {', '.join(MODEL_TYPES)} (an NLD checkpoint)")

    def integer(name: str, default: Any = ..., minimum: int = 1) -> int:
        if name not in raw or raw[name] is None:
            if default is ...:
                raise fail(f"missing required field {name!r}")
            return default
        v = raw[name]
        if isinstance(v, bool) or not isinstance(v, int):
            raise fail(f"{name} must be an integer, found {v!r}")
        if v < minimum:
            raise fail(f"{name} must be >= {minimum}, found {v}")
        return v

    def optional_id(name: str) -> int | None:
        v = raw.get(name)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise fail(f"{name} must be a non-negative integer token id, found {v!r}")
        return v

    vocab = integer("vocab_size")
    hidden = integer("hidden_size")
    heads = integer("num_attention_heads")
    kv_heads = integer("num_key_value_heads", heads)
    head_dim = integer("head_dim", None) or (hidden // heads)
    if heads % kv_heads:
        raise fail(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    if head_dim % 2:
        raise fail(f"head_dim must be even for rotary embeddings, found {head_dim}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise fail(f"hidden_act {act!r} is not supported (NLD uses silu)")
    if raw.get("tie_word_embeddings"):
        raise fail("tie_word_embeddings is true, but NLD has its own diffusion_head: set it to false")

    if "mask_token_id" not in raw or raw["mask_token_id"] is None:
        raise fail(
            "no mask_token_id: diffusion decoding needs the id of the token that marks undecided positions "
            "(add \"mask_token_id\" to config.json; the NLD releases use 100)"
        )
    mask_id = optional_id("mask_token_id")
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    for t in eos_ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise fail(f"eos_token_id must be a token id or a list of ids, found {eos!r}")
    for name, tid in (("mask_token_id", mask_id), *(("eos_token_id", t) for t in eos_ids)):
        if tid is not None and tid >= vocab:
            raise fail(f"{name} {tid} is outside the vocabulary (vocab_size {vocab})")

    dlm_type = raw.get("dlm_type", "llada")
    if dlm_type not in DLM_TYPES:
        raise fail(f"dlm_type {dlm_type!r} is not one of {', '.join(DLM_TYPES)}")

    rms_eps = raw.get("rms_norm_eps", 1e-5)
    if not isinstance(rms_eps, (int, float)) or not rms_eps > 0:
        raise fail(f"rms_norm_eps must be a positive number, found {rms_eps!r}")

    quant = raw.get("quantization_config")
    return NLDConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=integer("intermediate_size"),
        num_hidden_layers=integer("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        mask_token_id=mask_id,
        rope=_parse_rope(raw, fail),
        hidden_act=act,
        rms_norm_eps=float(rms_eps),
        max_position_embeddings=integer("max_position_embeddings", 32768),
        tie_word_embeddings=False,
        bos_token_id=optional_id("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=optional_id("pad_token_id"),
        block_size=integer("block_size", 32),
        dlm_type=dlm_type,
        model_type=model_type,
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        quantization_config=quant if isinstance(quant, dict) else None,
    )


def _parse_rope(raw: dict[str, Any], fail) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise fail(f"rope_parameters must be an object, found {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise fail(f"rope type {rope_type!r} is not supported (expected one of {', '.join(ROPE_TYPES)})")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise fail("rope_theta is missing or not a positive number (in rope_parameters or at top level)")

    def num(name: str) -> float | None:
        v = params.get(name)
        if v is None:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise fail(f"rope_parameters.{name} must be a number, found {v!r}")
        return float(v)

    orig = params.get("original_max_position_embeddings")
    if orig is not None and (isinstance(orig, bool) or not isinstance(orig, int) or orig < 1):
        raise fail(f"rope_parameters.original_max_position_embeddings must be a positive integer, found {orig!r}")
    beta = num("llama_4_scaling_beta") or 0.0
    if rope_type == "yarn":
        if num("factor") is None or orig is None:
            raise fail("YaRN rope_parameters need 'factor' and 'original_max_position_embeddings'")
    if beta and orig is None:
        raise fail("llama_4_scaling_beta needs rope_parameters.original_max_position_embeddings")
    truncate = params.get("truncate")
    return RopeConfig(
        rope_type=rope_type,
        rope_theta=float(theta),
        factor=num("factor"),
        original_max_position_embeddings=orig,
        beta_fast=num("beta_fast"),
        beta_slow=num("beta_slow"),
        mscale=num("mscale"),
        mscale_all_dim=num("mscale_all_dim"),
        attention_factor=num("attention_factor"),
        truncate=bool(truncate) if truncate is not None else None,
        llama_4_scaling_beta=beta,
    )
