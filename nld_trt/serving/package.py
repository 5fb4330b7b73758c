"""`nld-trt package`: a checkpoint or an engine -> a self-contained Triton model repository (see
triton_model_repo/).

The repository is written whole or not at all (`atomic_directory`); the checkpoint (weights, LoRA drafter,
tokenizer, chat template) or the `nld-trt build` output (graph, plan, config, tokenizer) is copied into
`nld/1/artifacts/` and hashed into `nld/1/manifest.json`, which every model references by relative path:
`nld` (streaming), `nld_sync` (one response per request) and `nld_tokenizer` (the tokenizer alone: tokenize.py).
"""

from __future__ import annotations

import json
import os
import shutil
import string
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..checkpoint import check_model_dir
from ..config import NLDConfig
from ..errors import CheckpointError, NLDError
from ..fileutil import atomic_directory
from ..kv.layout import DEFAULT_PAGE_SIZE
from .manifest import write_manifest
from . import tokenize
from .protocol import INPUTS, OUTPUTS, TensorSpec

TEMPLATE_ENV = "NLD_TRT_TEMPLATE"
STREAM_MODEL, SYNC_MODEL, TOKENIZER_MODEL = "nld", "nld_sync", tokenize.MODEL
TEMPLATE_FILES = ("config.pbtxt.template", "model.py", "tokenizer_model.py")


def template_dir() -> Path:
    """$NLD_TRT_TEMPLATE, else triton_model_repo/ of the source tree, else one installed as nld_trt/triton_model_repo."""
    here = Path(__file__).resolve()
    candidates = [Path(os.environ[TEMPLATE_ENV])] if os.environ.get(TEMPLATE_ENV) else [
        here.parents[2] / "triton_model_repo", here.parents[1] / "triton_model_repo"]
    for path in candidates:
        if all((path / name).is_file() for name in TEMPLATE_FILES):
            return path
    raise NLDError(f"the Triton model template is not at {candidates[0]}: set {TEMPLATE_ENV} to nld-trt's triton_model_repo/")


COMPILE_CHOICES = {"auto": None, "true": True, "false": False}  # config.pbtxt value -> nld_trt.load(compile=)


@dataclass(frozen=True)
class ServingOptions:
    """What a deployment holds and accepts; written into config.pbtxt parameters."""

    max_batch: int = 8  # sequences a model instance decodes at once at most
    max_seq_len: int = 2048  # the longest sequence
    max_block_length: int = 128
    max_tokens_cap: int = 1024
    default_max_tokens: int = 128
    instances: int = 1
    device: str = "cpu"
    dtype: str = ""  # "": float32 on CPU, bfloat16 on CUDA
    torch_threads: int = 1  # per instance; 0: PyTorch's default (every core, oversubscribed with 2+ instances)
    lora: bool = True
    max_prompt_bytes: int = 0  # text_input / messages size cap, checked before tokenizing (0: 32 x max_seq_len, >= 64 KiB)
    exclude_input_in_output: bool = True  # when a request does not say (TensorRT-LLM's own default is false)
    default_mode: str = "ar"  # the mode of a request that does not say: ar | dlm | linear_spec | auto
    compile: str = "auto"  # PyTorch executor: "true" compiled/graph-captured passes, "false" eager, "auto" (see nld_trt.load)
    # images (a vision-language checkpoint): caps checked before an image is decoded, apart from max_prompt_bytes
    max_image_bytes: int = 10 * 1024 * 1024  # one image, encoded
    max_image_pixels: int = 32 * 1024 * 1024  # one image, decoded (width x height)
    max_images_per_request: int = 8
    image_workers: int = 1  # threads decoding and encoding images beside the scheduler (0: in the prefill, on it)
    kv_cache_tokens: int = 0  # KV-cache positions (0: the default, max_batch x max_seq_len; a GPU's free memory caps it)
    kv_cache_gb: float = 0.0  # or its size in GiB (0: by tokens)
    page_size: int = DEFAULT_PAGE_SIZE  # positions per KV-cache page
    prefix_cache: bool = True  # reuse cached prefixes' KV
    kv_events: bool = True  # publish the prefix cache's KV events to subscribers (Dynamo's KV router): every cached
    # page's token ids, readable by any client of the gRPC port (off where untrusted clients reach it)

    def checked(self, config: NLDConfig) -> ServingOptions:
        """Clamp to the checkpoint and refuse combinations that cannot serve a single token."""
        for name in ("max_batch", "max_seq_len", "max_block_length", "max_tokens_cap", "default_max_tokens", "instances",
                     "max_image_bytes", "max_image_pixels", "max_images_per_request"):
            if getattr(self, name) < 1:
                raise NLDError(f"{name.replace('_', '-')} must be a positive integer")
        if self.kv_cache_tokens < 0 or self.kv_cache_gb < 0 or self.page_size < 1:
            raise NLDError("kv-cache-tokens and kv-cache-gb must be positive (0: the default) and page-size at least 1")
        if self.kv_cache_tokens and self.kv_cache_gb:
            raise NLDError("give kv-cache-tokens or kv-cache-gb, not both")
        if self.compile not in COMPILE_CHOICES:
            raise NLDError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile!r}")
        seq = min(self.max_seq_len, config.max_position_embeddings)
        cap = min(self.max_tokens_cap, seq - 1)
        if cap < 1:
            raise NLDError(f"max-seq-len {seq} leaves no room to generate")
        from ..decoding import MODES

        if self.default_mode not in MODES:
            raise NLDError(f"default-mode {self.default_mode!r} is not one of {', '.join(MODES)}")
        if self.max_prompt_bytes < 0:
            raise NLDError("max-prompt-bytes must be a positive integer (0: the default)")
        if self.image_workers < 0:
            raise NLDError("image-workers must be 0 (images encoded in the prefill) or a positive integer")
        prompt_bytes = self.max_prompt_bytes or max(65536, 32 * seq)
        if self.kv_cache_tokens:  # a pool too small for one sequence is refused at packaging, not at load
            pages = -(-self.kv_cache_tokens // self.page_size)
            if pages * self.page_size < seq:
                raise NLDError(f"kv-cache-tokens {self.kv_cache_tokens} holds {pages} pages of {self.page_size}, less "
                               f"than one sequence of max-seq-len {seq}: give at least {-(-seq // self.page_size) * self.page_size}")
        return ServingOptions(**{**asdict(self), "max_seq_len": seq, "max_tokens_cap": cap,
                                 "default_max_tokens": min(self.default_max_tokens, cap),
                                 "max_prompt_bytes": prompt_bytes})


def tensors_block(kind: str, specs: tuple[TensorSpec, ...]) -> str:
    rows = [
        f'  {{ name: "{t.name}" data_type: {t.dtype} dims: {t.dims}'
        + (" optional: true" if kind == "input" else "") + " }"
        for t in specs
    ]
    return f"{kind} [\n" + ",\n".join(rows) + "\n]"


def parameters_block(params: dict[str, object]) -> str:
    return "\n".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{str(v).lower() if isinstance(v, bool) else v}" }} }}'
        for k, v in params.items()
    )


def image_support(config: NLDConfig, engine: Path | None, device: str) -> str:
    """The `images` parameter of a repository: "true" when its model takes images, else why not (what the OpenAI
    front end answers an image request with, before sending anything). `engine`: the build packaged, if any."""
    from ..engine.loader import image_refusal
    from ..prompt import engine_text_only, text_only

    if not config.is_vlm:
        return text_only("the served model")
    refusal = image_refusal(engine, device) if engine is not None else None
    return "true" if refusal is None else engine_text_only("the served model", refusal)


def render_config(name: str, decoupled: bool, manifest: str, options: ServingOptions, images: str = "true") -> str:
    """config.pbtxt of `nld` or `nld_sync`; `images`: `image_support`'s answer."""
    calibration = str(Path(manifest).parent / "calibration")  # beside the artifacts, shared by both models
    params = {"manifest": manifest, "calibration_dir": calibration, "tokenizer_model": TOKENIZER_MODEL,
              **{k: v for k, v in asdict(options).items() if k != "instances"}, "images": images}
    purpose = ("decoupled: one response per decoding step when stream=true (gRPC stream, HTTP generate_stream)"
               if decoupled else "one response per request: unary gRPC/HTTP infer and HTTP generate")
    return _render(name, purpose, decoupled, INPUTS, OUTPUTS, options.max_batch, options.instances,
                   "KIND_GPU" if options.device.startswith("cuda") else "KIND_CPU", params)


def render_tokenizer_config(manifest: str, options: ServingOptions) -> str:
    """config.pbtxt of `nld_tokenizer`: one CPU instance, whatever the device of the model."""
    params = {"manifest": manifest, "max_prompt_bytes": options.max_prompt_bytes, "max_seq_len": options.max_seq_len}
    return _render(TOKENIZER_MODEL, "the checkpoint's tokenizer: tokenize, detokenize, tokenizer_info "
                   "(nld_trt/serving/tokenize.py)", False, tokenize.INPUTS, tokenize.OUTPUTS, options.max_batch, 1,
                   "KIND_CPU", params)


def _render(name: str, purpose: str, decoupled: bool, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
            max_batch: int, instances: int, instance_kind: str, params: dict[str, object]) -> str:
    from .. import __version__

    text = (template_dir() / "config.pbtxt.template").read_text()
    return string.Template(text).substitute(
        version=__version__, purpose=purpose, name=name, max_batch=max_batch,
        decoupled="true" if decoupled else "false", inputs=tensors_block("input", inputs),
        outputs=tensors_block("output", outputs), instances=instances, instance_kind=instance_kind,
        parameters=parameters_block(params),
    )


def check_checkpoint(model_dir: Path) -> NLDConfig:
    """Fail at packaging time, not at load time, on a directory that is not a usable checkpoint (or engine)."""
    return check_model_dir(model_dir)


def check_engine(engine_dir: Path, options: ServingOptions) -> tuple[NLDConfig, ServingOptions]:
    """An `nld-trt build` output that the chosen device can run, and options clamped to its limits."""
    from ..checkpoint import ENGINE_FILE
    from ..engine.loader import is_engine_dir

    if not engine_dir.is_dir():
        raise CheckpointError(f"engine directory {engine_dir} does not exist")
    if not is_engine_dir(engine_dir):
        raise CheckpointError(f"{engine_dir} is not an nld-trt build output (no {ENGINE_FILE}): run nld-trt build first")
    report = json.loads((engine_dir / ENGINE_FILE).read_text())
    if options.device.startswith("cuda") and not report.get("plan"):
        raise NLDError(f"{engine_dir} holds no TensorRT plan, so --device cuda cannot serve it: run nld-trt build "
                       "on a GPU host with TensorRT, or package with --device cpu (ONNX Runtime)")
    if not options.device.startswith("cuda") and report["dtype"] != "float32":
        raise NLDError(f"{engine_dir} holds a {report['dtype']} graph for TensorRT; ONNX Runtime on CPU serves a "
                       "float32 build (nld-trt build --dtype float32), or package with --device cuda")
    limits = report["limits"]
    clamped = replace(options, max_batch=min(options.max_batch, limits["max_batch"]),
                      max_seq_len=min(options.max_seq_len, limits["max_seq_len"]),
                      max_block_length=min(options.max_block_length, limits["max_block"]),
                      page_size=limits.get("page_size", options.page_size))  # an engine keeps its build's pages
    return check_checkpoint(engine_dir), clamped


def package_repository(
    model_dir: str | Path | None,
    output: str | Path,
    options: ServingOptions = ServingOptions(),
    sync_model: bool = True,
    overwrite: bool = False,
    engine: bool = False,
) -> Path:
    """Write the model repository `output` for checkpoint `model_dir` (None: the embedded default model), or
    with `engine`, for the `nld-trt build` output `model_dir` (TensorRT plan on a GPU, its ONNX graph on CPU)."""
    from ..runtime import default_model_path

    if engine:
        if model_dir is None:
            raise NLDError("give the engine directory to package (an nld-trt build output)")
        model_dir = Path(model_dir)
        config, options = check_engine(model_dir, options)
    else:
        model_dir = Path(model_dir) if model_dir is not None else default_model_path()
        config = check_checkpoint(model_dir)
    options = options.checked(config)
    template = template_dir()
    output = Path(output)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        version = tmp / STREAM_MODEL / "1"
        shutil.copytree(model_dir, version / "artifacts", ignore=shutil.ignore_patterns(".*", "__pycache__"))
        write_manifest(version / "manifest.json", version / "artifacts", kind="engine" if engine else "checkpoint",
                       source=str(model_dir.resolve()))
        models = {STREAM_MODEL: (True, "1/manifest.json")}
        if sync_model:
            models[SYNC_MODEL] = (False, f"../{STREAM_MODEL}/1/manifest.json")
        images = image_support(config, model_dir if engine else None, options.device)
        for name, (decoupled, manifest) in models.items():
            (tmp / name / "1").mkdir(parents=True, exist_ok=True)
            shutil.copy(template / "model.py", tmp / name / "1" / "model.py")
            (tmp / name / "config.pbtxt").write_text(render_config(name, decoupled, manifest, options, images))
        (tmp / TOKENIZER_MODEL / "1").mkdir(parents=True)
        shutil.copy(template / "tokenizer_model.py", tmp / TOKENIZER_MODEL / "1" / "model.py")
        (tmp / TOKENIZER_MODEL / "config.pbtxt").write_text(
            render_tokenizer_config(f"../{STREAM_MODEL}/1/manifest.json", options))
    return output
