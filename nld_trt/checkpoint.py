"""Reading an NLD checkpoint directory: safetensors weights (single or sharded) and the LoRA draft adapter.

Only safetensors are read, never pickles, and no checkpoint code runs. Every tensor is checked against the
shapes `NLDConfig.expected_shapes()` derives from config.json, so a wrong or damaged file fails here with
the tensor's name instead of deep inside a matmul. `check_model_dir` is the one check every command runs on
its model directory before any work, so a directory that cannot be served is refused by `nld-trt package`,
not by the server that loads it later.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import NLDConfig
from .errors import CheckpointError
from .vision.config import VLMConfig, canonical_name

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LORA_DIR = "linear_spec_lora"
LORA_PREFIX = "base_model.model.encoder.layers."
ENGINE_FILE = "engine.json"  # what marks an `nld-trt build` output: a graph or plan instead of weights
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Run by the user, in an environment they trust: nld-trt itself never unpickles. weights_only=True keeps
# torch's unpickler to tensors; every matching file (shards too) goes into one safetensors file.
CONVERT = ("import glob, os, sys, torch; from safetensors.torch import save_file; d, pattern, out = sys.argv[1:]; "
           "sd = {}; [sd.update((k, v.clone().contiguous()) for k, v in torch.load(f, weights_only=True).items()) "
           "for f in sorted(glob.glob(os.path.join(glob.escape(d), pattern)))]; "
           'save_file(sd, os.path.join(d, out), metadata={"format": "pt"})')


def pickle_refusal(directory: Path, pickles: list[str], pattern: str, out: str) -> CheckpointError:
    """Why pickled weights are refused, and the one command that converts them into `out`."""
    command = f"python -c {shlex.quote(CONVERT)} {shlex.quote(str(directory))} {shlex.quote(pattern)} {out}"
    return CheckpointError(
        f"{directory} holds pickled weights ({', '.join(pickles)}) and no {out}: nld-trt never unpickles (loading "
        f"a pickle can run code shipped with it). Convert them to safetensors in an environment you trust, then "
        f"retry: `{command}`"
    )


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from `model.safetensors.index.json` or the single file."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e!r}); re-download it") from None
        files = {name: directory / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"shard {shard.name} listed in {index.name} is missing from {directory}")
        return files
    single = directory / "model.safetensors"
    if not single.is_file():
        found = sorted(p.name for p in directory.glob("*.safetensors"))
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if pickles and not found:
            transformers = any(p.startswith("pytorch_model") and p.endswith(".bin") for p in pickles)
            pattern = "pytorch_model*.bin" if transformers else f"*{Path(pickles[0]).suffix}"
            raise pickle_refusal(directory, pickles, pattern, "model.safetensors")
        hint = f" (found {', '.join(found)}, but no model.safetensors.index.json)" if found else ""
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {directory}{hint}")
    return weight_files_single(single)


def read_tensors(files: dict[str, Path], names: list[str], stored: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Load the named tensors, one open per shard; a damaged shard fails with its file name. `stored` maps a
    name to the one the file uses where they differ (a VLM's other spelling, see `canonical_files`)."""
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    out: dict[str, torch.Tensor] = {}
    for path, group in by_file.items():
        try:
            with safe_open(path, framework="pt") as f:
                present = set(f.keys())
                for n in group:
                    key = (stored or {}).get(n, n)
                    if key not in present:
                        raise CheckpointError(f"tensor {key} is listed for {path.name} but that file does not hold it")
                    out[n] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path} is truncated or corrupted ({e}); re-download it") from None
    return out


def check_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...], where: str, source: str = "config.json") -> None:
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(
            f"{where}: tensor {name} has shape {list(t.shape)}, expected {list(shape)} from {source}"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise CheckpointError(
            f"{where}: tensor {name} has dtype {t.dtype}, supported: float32, float16, bfloat16 "
            "(quantized checkpoints are loaded through `nld-trt quantize` outputs)"
        )
    if not torch.isfinite(t).all():
        raise CheckpointError(f"{where}: tensor {name} holds NaN or infinite values; the file is damaged")


def check_names(where: str, expected: set[str], found: set[str], missing_hint: str, unexpected_hint: str) -> None:
    """Fail on missing or unexpected tensor names, naming the first five of them."""
    for what, names, hint in (("missing", expected - found, missing_hint), ("unexpected", found - expected,
                                                                            unexpected_hint)):
        if names:
            names = sorted(names)
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            raise CheckpointError(f"{where}: {what} tensors {', '.join(names[:5])}{more} ({hint})")


def canonical_files(directory: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Tensor name in the release spelling -> file, and -> the name the file stores (a VLM checkpoint may use
    the LLaVA spelling `vision_tower.*` / `language_model.*`: nld_trt.vision.config.canonical_name)."""
    files = weight_files(directory)
    stored: dict[str, str] = {}
    for name in files:
        canon = canonical_name(name)
        if canon in stored:
            raise CheckpointError(f"{directory}: tensors {stored[canon]} and {name} are the same tensor in two spellings")
        stored[canon] = name
    return {c: files[s] for c, s in stored.items()}, {c: s for c, s in stored.items() if c != s}


def expected_shapes(directory: Path, config: NLDConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an unquantized checkpoint directory must hold: the text model's and, for a VLM, its vision
    tower's and projector's."""
    return VLMConfig.from_file(directory).expected_shapes() if config.is_vlm else config.expected_shapes()


def backbone_files(directory: Path, config: NLDConfig) -> tuple[dict[str, Path], dict[str, str]]:
    """Tensor name -> file of an unquantized checkpoint (and the stored names, see `canonical_files`), its
    names checked against the configuration."""
    files, stored = canonical_files(directory)
    check_names(str(directory), set(expected_shapes(directory, config)), set(files),
                missing_hint="is this an NLD checkpoint, and does config.json match it?",
                unexpected_hint="does num_hidden_layers in config.json match the weights?")
    return files, stored


def _load_checked(directory: Path, config: NLDConfig, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    files, stored = backbone_files(directory, config)
    tensors = read_tensors(files, list(expected), stored)
    for name, shape in expected.items():
        check_tensor(name, tensors[name], shape, str(directory))
    return tensors


def load_weights(directory: str | Path, config: NLDConfig) -> dict[str, torch.Tensor]:
    """Every backbone and head tensor of the checkpoint (a VLM's text model: not its vision encoder), validated
    against the configuration."""
    return _load_checked(Path(directory), config, config.expected_shapes())


def load_vision_weights(directory: str | Path, config: VLMConfig) -> dict[str, torch.Tensor]:
    """A VLM checkpoint's vision tower and projector tensors (release names), validated against config.json.
    Only these are checked here: the text tensors are load_weights' or, quantized, nld_trt.quant.loader's."""
    directory = Path(directory)
    files, stored = canonical_files(directory)
    expected = config.vision_shapes()
    missing = sorted(set(expected) - set(files))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{directory}: missing tensors {', '.join(missing[:5])}{more} (a vision-language "
                              "checkpoint needs its vision tower and projector; does vision_config match them?)")
    tensors = read_tensors(files, list(expected), stored)
    for name, shape in expected.items():
        check_tensor(name, tensors[name], shape, str(directory))
    return tensors


# The PEFT adapter ---------------------------------------------------------------------------------
# adapter_config.json fields by what they do to the forward. Applied exactly: r, lora_alpha, use_rslora,
# rank_pattern, alpha_pattern, target_modules (o_proj only), layers_to_transform (which layers have tensors).
INERT = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
         "inference_mode", "lora_dropout",  # dropout is off at inference
         "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
         "runtime_config", "ensure_weight_tying"}  # initialisation or placement only
MUST_BE_DEFAULT = {"fan_in_fan_out": False, "bias": "none", "use_dora": False, "lora_bias": False, "use_qalora": False,
                   "modules_to_save": None, "exclude_modules": None, "layers_pattern": None, "layer_replication": None,
                   "alora_invocation_tokens": None, "trainable_token_indices": None, "target_parameters": None,
                   "megatron_config": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
                   "velora_config": None, "monteclora_config": None}
APPLIED = {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "layers_to_transform",
           "init_lora_weights"}
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")  # the others (pissa, olora, corda, loftq...) change W


def module_key(layer: int) -> str:
    """The o_proj's module name in the base model, as PEFT matches rank_pattern / alpha_pattern keys."""
    return f"{LORA_PREFIX.removeprefix('base_model.model.')}{layer}.self_attn.o_proj"


def pattern_value(patterns: dict, key: str, default):
    """PEFT's rule: the first pattern (a regex) matching the end of the key after a dot, else the default."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


@dataclass
class LoRAAdapter:
    """The linear_spec draft adapter: per layer (A [r_i, in], B [out, r_i]), scaled as PEFT scales it."""

    layers: dict[int, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def layer_rank(self, layer: int) -> int:
        return pattern_value(self.rank_pattern, module_key(layer), self.rank)

    @property
    def scale(self) -> dict[int, float]:
        """Per layer: alpha / r, or alpha / sqrt(r) with rsLoRA, with that layer's rank and alpha."""
        scales = {}
        for i in self.layers:
            r, alpha = self.layer_rank(i), pattern_value(self.alpha_pattern, module_key(i), self.alpha)
            scales[i] = alpha / math.sqrt(r) if self.use_rslora else alpha / r
        return scales


def _empty(value) -> bool:
    return value is None or value is False or value in ("", [], {})


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json, refusing any option that would make PEFT's forward differ from ours."""
    try:
        acfg = json.loads(path.read_text())
        rank, alpha = acfg["r"], acfg.get("lora_alpha", 8)  # PEFT's LoraConfig default
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid adapter config ({e!r})") from None
    if acfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {acfg['peft_type']!r}; the draft adapter must be a LORA adapter")
    for name, default in MUST_BE_DEFAULT.items():
        value = acfg.get(name, default)
        if value != default and not (default is None and _empty(value)):
            raise CheckpointError(f"{path}: {name} is {value!r}, which changes the adapter's forward in a way "
                                  f"nld-trt does not implement (supported: {default!r})")
    for name, value in acfg.items():
        if name not in INERT | APPLIED | set(MUST_BE_DEFAULT) and not _empty(value):
            raise CheckpointError(f"{path}: unknown option {name} = {value!r}; nld-trt applies only what it "
                                  "understands, and refuses an adapter it might apply differently from PEFT")
    init = acfg.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise CheckpointError(f"{path}: init_lora_weights is {init!r}: such an adapter is meant for modified base "
                              "weights; convert it to a plain LoRA first (peft's path_initial_model_for_weight_conversion)")

    def positive_int(name, v):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CheckpointError(f"{path}: {name} must be a positive integer, found {v!r}")
        return v

    def number(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise CheckpointError(f"{path}: {name} must be a number, found {v!r}")
        return float(v)

    def patterns(name, check):
        value = acfg.get(name) or {}
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: {name} must map module-name patterns to values, found {value!r}")
        for key in value:
            try:
                re.compile(key)
            except re.error as e:
                raise CheckpointError(f"{path}: {name} key {key!r} is not a valid regular expression ({e})") from None
        return {key: check(f"{name}[{key!r}]", v) for key, v in value.items()}

    targets = acfg.get("target_modules", ["o_proj"])
    if targets not in ("o_proj", ["o_proj"]):
        raise CheckpointError(f"{path}: target_modules is {targets}; the NLD draft adapter targets only o_proj")
    use_rslora = acfg.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise CheckpointError(f"{path}: use_rslora must be true or false, found {use_rslora!r}")
    layers = acfg.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        raise CheckpointError(f"{path}: layers_to_transform must be a layer index or a list of them, found {layers!r}")
    return {"rank": positive_int("r", rank), "alpha": number("lora_alpha", alpha), "use_rslora": use_rslora,
            "rank_pattern": patterns("rank_pattern", positive_int), "alpha_pattern": patterns("alpha_pattern", number),
            "layers_to_transform": layers}


def load_lora(directory: str | Path, config: NLDConfig) -> LoRAAdapter | None:
    """The `linear_spec_lora/` PEFT adapter of a checkpoint, or None when it has none."""
    root = Path(directory) / LORA_DIR
    if not root.exists():
        return None
    where = str(root)
    cfg_path, weights_path = root / "adapter_config.json", root / "adapter_model.safetensors"
    if not weights_path.is_file() and (root / "adapter_model.bin").is_file():
        raise pickle_refusal(root, ["adapter_model.bin"], "adapter_model.bin", weights_path.name)
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{where}: {p.name} is missing (a PEFT adapter needs both files)")
    acfg = read_adapter_config(cfg_path)
    only = acfg.pop("layers_to_transform")
    adapter = LoRAAdapter({}, **acfg)
    files = weight_files_single(weights_path)
    q = config.num_attention_heads * config.head_dim
    layers: dict[int, dict[str, torch.Tensor]] = {}
    tensors = read_tensors(files, list(files))
    for name, t in tensors.items():
        rest = name[len(LORA_PREFIX):] if name.startswith(LORA_PREFIX) else None
        parts = rest.split(".") if rest else []
        if (
            len(parts) != 5
            or not parts[0].isdigit()
            or parts[1:3] != ["self_attn", "o_proj"]
            or parts[3] not in ("lora_A", "lora_B")
            or parts[4] != "weight"
            or int(parts[0]) >= config.num_hidden_layers
        ):
            raise CheckpointError(f"{where}: unexpected adapter tensor {name}")
        i, which = int(parts[0]), parts[3]
        if only is not None and i not in only:
            raise CheckpointError(f"{cfg_path}: layers_to_transform is {only}, but the adapter holds layer {i}")
        r = adapter.layer_rank(i)
        shape = (r, q) if which == "lora_A" else (config.hidden_size, r)
        check_tensor(name, t, shape, where, source=f"{cfg_path.name} (r = {r} for {module_key(i)}) and config.json")
        layers.setdefault(i, {})[which] = t
    if not layers:
        raise CheckpointError(f"{where}: the adapter holds no o_proj LoRA tensors")
    for i, ab in layers.items():
        for which in ("lora_A", "lora_B"):
            if which not in ab:
                raise CheckpointError(f"{where}: layer {i} has no {which} tensor")
    adapter.layers = {i: (ab["lora_A"], ab["lora_B"]) for i, ab in layers.items()}
    return adapter


def check_model_dir(directory: str | Path, lora: bool = True) -> NLDConfig:
    """The check every command runs on its model directory (`--model`, build's `--checkpoint`, `package`)
    before any work: it exists, config.json and the tokenizer are valid, the weights are safetensors whose
    headers hold the tensors config.json needs (an `nld-trt build` output holds a graph instead), and, with
    `lora`, a `linear_spec_lora/` adapter is valid. Reads file headers and the small adapter, not the weights."""
    from .tokenizer import NLDTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    config = NLDConfig.from_file(directory)
    NLDTokenizer(directory)
    if (directory / ENGINE_FILE).is_file():
        return config
    if config.quantization_config is None:
        backbone_files(directory, config)
    else:  # a ModelOpt export: its tensor names depend on the recipe, checked when nld_trt.quant loads it
        weight_files(directory)
    if lora:
        load_lora(directory, config)
    return config


def weight_files_single(path: Path) -> dict[str, Path]:
    """Tensor name -> path for one safetensors file (its header is read and checked)."""
    try:
        with safe_open(path, framework="pt") as f:
            return {name: path for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or corrupted ({e}); re-download it") from None


# Writing ------------------------------------------------------------------------------------------

def write_weight_files(directory: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    """The release's weight files: model.safetensors for one shard, else model-0000i-of-0000n.safetensors and the
    model.safetensors.index.json that maps each tensor to its file."""
    from safetensors.torch import save_file

    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(names, shards):
        save_file({n: t.detach().contiguous().cpu() for n, t in shard.items()}, str(directory / fname),
                  metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {name: fname for fname, shard in zip(names, shards) for name in shard}
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _bytes(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"bad shard size {size!r}")
    return int(float(m.group(1)) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)])


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str = "5GB") -> None:
    """The weight files of `tensors`, split into shards of at most `max_shard_size` (transformers' convention)."""
    limit = _bytes(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    write_weight_files(directory, shards)


def save_checkpoint(
    directory: str | Path,
    config: NLDConfig | VLMConfig,
    tensors: dict[str, torch.Tensor],
    extra_files: dict[str, str] | None = None,
    lora: LoRAAdapter | None = None,
    shards: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint in the release layout, atomically (a temporary directory renamed at the end).

    `extra_files` are written as text next to config.json (tokenizer files, chat template). A VLMConfig writes
    the vision-language layout (its tensors: the text model's and the vision encoder's).
    """
    from .fileutil import atomic_directory

    expected = config.expected_shapes()
    if set(tensors) != set(expected):
        raise CheckpointError(f"tensors do not match the configuration: {sorted(set(tensors) ^ set(expected))[:5]}")
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        config.save(tmp)
        names = list(expected)
        groups = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
        write_weight_files(tmp, [{n: tensors[n] for n in group} for group in groups])
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if lora is not None:
            save_lora(tmp, lora, config)
    return Path(directory)


def save_lora(directory: Path, lora: LoRAAdapter, config: NLDConfig) -> None:
    """The `linear_spec_lora/` PEFT adapter (o_proj only)."""
    from safetensors.torch import save_file

    root = directory / LORA_DIR
    root.mkdir(parents=True, exist_ok=True)
    acfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "use_rslora": lora.use_rslora,
        "rank_pattern": lora.rank_pattern,
        "alpha_pattern": lora.alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["o_proj"],
        "base_model_name_or_path": None,
    }
    (root / "adapter_config.json").write_text(json.dumps(acfg, indent=2) + "\n")
    tensors = {}
    for i, (a, b) in sorted(lora.layers.items()):
        tensors[f"{LORA_PREFIX}{i}.self_attn.o_proj.lora_A.weight"] = a.contiguous()
        tensors[f"{LORA_PREFIX}{i}.self_attn.o_proj.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
