"""The vision-language configuration: the text `NLDConfig` as it is, plus the Pixtral tower and the projector.

A Nemotron-Labs-Diffusion-VLM `config.json` keeps the text model's fields at its root (`model_type`
`nemotron_labs_diffusion_vlm`), the Pixtral tower under `vision_config`, and the Mistral 3 projector's fields
(`spatial_merge_size`, `projector_hidden_act`, `multimodal_projector_bias`, `vision_feature_layer`) at the root
beside them. `NLDConfig.from_file` reads the text part of such a file unchanged, so every text-only path
(executors, quantization, engines) sees the language model it already knows; `VLMConfig` adds the rest.

Weight names: the release keeps the tower and projector under `encoder.` beside the text weights
(`encoder.vision_tower.*`, `encoder.multi_modal_projector.*`); one public port assumes the LLaVA spelling
(`vision_tower.*`, `multi_modal_projector.*`, text weights under `language_model.`). `canonical_name` maps
both to the release spelling, so either loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import VLM_MODEL_TYPE, NLDConfig
from ..errors import CheckpointError

VISION_PREFIX = "encoder.vision_tower."
PROJECTOR_PREFIX = "encoder.multi_modal_projector."
ACTIVATIONS = ("silu", "gelu")
# The image tokens, looked up by name in the tokenizer (ids 18-21 in the release).
IMAGE_TOKEN_NAMES = {"start": "<|image_start|>", "pad": "<|image_pad|>", "break": "<|image_break|>",
                     "end": "<|image_end|>"}


def canonical_name(name: str) -> str:
    """A checkpoint tensor name in the release spelling: `vision_tower.X` -> `encoder.vision_tower.X`,
    `multi_modal_projector.X` -> `encoder.multi_modal_projector.X`, `language_model.X` -> `X`."""
    if name.startswith(("vision_tower.", "multi_modal_projector.")):
        return "encoder." + name
    return name.removeprefix("language_model.")


def weight_spelling(names) -> str:
    """Which spelling a checkpoint's tensor names use: 'release' (`encoder.vision_tower.*`), 'llava'
    (`vision_tower.*` / `language_model.*`) or 'text' (no vision tensors)."""
    names = list(names)
    if any(n.startswith(("vision_tower.", "multi_modal_projector.", "language_model.")) for n in names):
        return "llava"
    return "release" if any(n.startswith((VISION_PREFIX, PROJECTOR_PREFIX)) for n in names) else "text"


@dataclass(frozen=True)
class VisionConfig:
    """The Pixtral tower (`vision_config`, model_type pixtral). Its RMSNorms use eps 1e-5, as Pixtral's do."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    image_size: int = 1540  # the tower's largest image side (informative: the processor caps the input)
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        h, i, p = self.hidden_size, self.intermediate_size, self.patch_size
        per_layer = 2 * h + 4 * h * h + 3 * h * i
        return self.num_channels * p * p * h + h + self.num_hidden_layers * per_layer

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "pixtral", "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
                "head_dim": self.head_dim, "patch_size": self.patch_size, "num_channels": self.num_channels,
                "hidden_act": self.hidden_act, "image_size": self.image_size,
                "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta}}

    def to_transformers(self):
        """The equivalent `transformers.PixtralVisionConfig` (the numerical oracle's)."""
        from transformers import PixtralVisionConfig

        return PixtralVisionConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_channels=self.num_channels, image_size=self.image_size, patch_size=self.patch_size,
            hidden_act=self.hidden_act, rope_parameters={"rope_type": "axial", "rope_theta": self.rope_theta},
        )


@dataclass(frozen=True)
class VLMConfig:
    """A vision-language NLD: the text model (`text`, exactly the text release's `NLDConfig`), the Pixtral tower
    and the Mistral 3 projector (RMSNorm -> 2x2 patch merger -> linear_1 -> act -> linear_2)."""

    text: NLDConfig
    vision: VisionConfig = field(default_factory=VisionConfig)
    spatial_merge_size: int = 2
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = False
    vision_feature_layer: int = -1  # the tower hidden state the projector reads (0: after ln_pre, k: after layer k)

    @property
    def feature_layer(self) -> int:
        """vision_feature_layer as a non-negative index into (ln_pre output, layer 1, ..., layer N)."""
        return self.vision_feature_layer % (self.vision.num_hidden_layers + 1)

    @property
    def cell(self) -> int:
        """Pixels per side of one image token (a merged cell): patch x merge (28 in the release)."""
        return self.vision.patch_size * self.spatial_merge_size

    def vision_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tower's and projector's tensors in the release spelling, and their shapes."""
        v, h = self.vision, self.vision.hidden_size
        p, i, t = v.patch_size, v.intermediate_size, self.text.hidden_size
        shapes: dict[str, tuple[int, ...]] = {
            VISION_PREFIX + "patch_conv.weight": (h, v.num_channels, p, p),
            VISION_PREFIX + "ln_pre.weight": (h,),
        }
        for n in range(v.num_hidden_layers):
            q = f"{VISION_PREFIX}transformer.layers.{n}."
            shapes[q + "attention_norm.weight"] = (h,)
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shapes[q + f"attention.{proj}.weight"] = (h, h)
            shapes[q + "ffn_norm.weight"] = (h,)
            shapes[q + "feed_forward.gate_proj.weight"] = (i, h)
            shapes[q + "feed_forward.up_proj.weight"] = (i, h)
            shapes[q + "feed_forward.down_proj.weight"] = (h, i)
        m = self.spatial_merge_size
        shapes[PROJECTOR_PREFIX + "norm.weight"] = (h,)
        shapes[PROJECTOR_PREFIX + "patch_merger.merging_layer.weight"] = (h, h * m * m)
        shapes[PROJECTOR_PREFIX + "linear_1.weight"] = (t, h)
        shapes[PROJECTOR_PREFIX + "linear_2.weight"] = (t, t)
        if self.multimodal_projector_bias:
            shapes[PROJECTOR_PREFIX + "linear_1.bias"] = (t,)
            shapes[PROJECTOR_PREFIX + "linear_2.bias"] = (t,)
        return shapes

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the release VLM layout: the text model's and the vision encoder's."""
        return {**self.text.expected_shapes(), **self.vision_shapes()}

    def vision_parameters(self) -> int:
        return sum(_numel(s) for s in self.vision_shapes().values())

    def to_dict(self) -> dict[str, Any]:
        d = self.text.to_dict()
        d.update({
            "architectures": ["NemotronLabsDiffusionVLMModel"],
            "model_type": VLM_MODEL_TYPE,
            "vision_config": self.vision.to_dict(),
            "spatial_merge_size": self.spatial_merge_size,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "vision_feature_layer": self.vision_feature_layer,
        })
        return d

    def save(self, directory: str | Path) -> None:
        (Path(directory) / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def to_mistral3(self, image_token_id: int):
        """`transformers.Mistral3Config` of the same model: text config as Ministral 3, the pad id as its image
        token (the oracle for a greedy loop with images; `diffusion_head` is its LM head)."""
        from transformers import Mistral3Config

        text = self.text.to_transformers()
        return Mistral3Config(
            vision_config=self.vision.to_transformers(), text_config=text, image_token_index=image_token_id,
            projector_hidden_act=self.projector_hidden_act, vision_feature_layer=self.vision_feature_layer,
            multimodal_projector_bias=self.multimodal_projector_bias, spatial_merge_size=self.spatial_merge_size,
            tie_word_embeddings=False,
        )

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> VLMConfig:
        text = NLDConfig.from_dict(raw, source)
        if text.model_type != VLM_MODEL_TYPE:
            raise CheckpointError(f"{source}: model_type is {text.model_type!r}, not {VLM_MODEL_TYPE!r}: a text-only "
                                  "NLD checkpoint has no vision tower")
        return _parse(raw, text, source)

    @classmethod
    def from_file(cls, path: str | Path) -> VLMConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        text = NLDConfig.from_file(path)  # checks the file and the text fields
        if not text.is_vlm:
            raise CheckpointError(f"{path}: model_type is {text.model_type!r}, not {VLM_MODEL_TYPE!r}: a text-only "
                                  "NLD checkpoint has no vision tower")
        return _parse(json.loads(path.read_text()), text, str(path))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _parse(raw: dict[str, Any], text: NLDConfig, source: str) -> VLMConfig:
    def fail(msg: str) -> CheckpointError:
        return CheckpointError(f"{source}: {msg}")

    def integer(obj: dict, name: str, where: str, default: Any = ..., minimum: int = 1) -> int:
        v = obj.get(name)
        if v is None:
            if default is ...:
                raise fail(f"missing required field {where}{name}")
            return default
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise fail(f"{where}{name} must be an integer >= {minimum}, found {v!r}")
        return v

    vc = raw.get("vision_config")
    if not isinstance(vc, dict):
        raise fail("a nemotron_labs_diffusion_vlm config needs a vision_config object (the Pixtral tower), "
                   f"found {vc!r}")
    if vc.get("model_type", "pixtral") != "pixtral":
        raise fail(f"vision_config.model_type is {vc.get('model_type')!r}; nld-trt implements the pixtral tower")
    w = "vision_config."
    hidden = integer(vc, "hidden_size", w)
    heads = integer(vc, "num_attention_heads", w)
    if hidden % heads:
        raise fail(f"vision_config.hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    head_dim = vc.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise fail(f"vision_config.head_dim is {head_dim!r}, but Pixtral's attention has hidden_size / "
                   f"num_attention_heads = {hidden // heads} per head")
    if (hidden // heads) % 4:
        raise fail(f"vision_config head dimension {hidden // heads} must be a multiple of 4 (2D rotary)")
    act = vc.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise fail(f"vision_config.hidden_act {act!r} is not supported (expected one of {', '.join(ACTIVATIONS)})")
    rope = vc.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise fail(f"vision_config.rope_parameters must be an object, found {rope!r}")
    if rope.get("rope_type", "axial") not in ("axial", "default"):
        raise fail(f"vision_config rope type {rope.get('rope_type')!r} is not Pixtral's 2D (axial) rotary")
    theta = rope.get("rope_theta", vc.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise fail(f"vision_config rope_theta must be a positive number, found {theta!r}")
    image_size = vc.get("image_size", 1540)
    vision = VisionConfig(
        hidden_size=hidden, intermediate_size=integer(vc, "intermediate_size", w),
        num_hidden_layers=integer(vc, "num_hidden_layers", w), num_attention_heads=heads,
        patch_size=integer(vc, "patch_size", w), num_channels=integer(vc, "num_channels", w, 3), hidden_act=act,
        rope_theta=float(theta), image_size=image_size if isinstance(image_size, int) else 1540,
    )
    merge = integer(raw, "spatial_merge_size", "", 2)
    pact = raw.get("projector_hidden_act", "gelu")
    if pact not in ACTIVATIONS:
        raise fail(f"projector_hidden_act {pact!r} is not supported (expected one of {', '.join(ACTIVATIONS)})")
    bias = raw.get("multimodal_projector_bias", False)
    if not isinstance(bias, bool):
        raise fail(f"multimodal_projector_bias must be true or false, found {bias!r}")
    layer = raw.get("vision_feature_layer", -1)
    n = vision.num_hidden_layers
    if isinstance(layer, list):  # transformers' Mistral 3 projector normalises one layer's width: so does ours
        raise fail(f"vision_feature_layer {layer!r}: a list of layers is not supported (the Mistral 3 projector reads "
                   "one layer)")
    if isinstance(layer, bool) or not isinstance(layer, int) or not -(n + 1) <= layer <= n:
        raise fail(f"vision_feature_layer must be a layer index in [-{n + 1}, {n}], found {layer!r}")
    return VLMConfig(text=text, vision=vision, spatial_merge_size=merge, projector_hidden_act=pact,
                     multimodal_projector_bias=bias, vision_feature_layer=layer)
