"""`nld-trt quantize` as a function: check everything, measure the original, calibrate, export, measure the
export as the runtime loads it, compare, and move the result into place only at the end.

Nothing is written unless the whole run succeeds: the checkpoint is built in a temporary directory beside
the output (`fileutil.atomic_directory`), and every input error (format, data file, dimensions, output
path) is raised before the first forward pass.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_lora, load_vision_weights, load_weights
from ..config import NLDConfig
from ..fileutil import atomic_directory
from ..runtime import build_model, default_model_path, resolve_dtype
from ..tokenizer import NLDTokenizer
from . import QuantizationError, is_quantized
from .calib_data import (build_passes, calibration_records, encode_record, evaluation_records, image_passes,
                         image_records, read_jsonl)
from .loader import linear_shapes, load_quantized_model
from .recipes import KV_CACHE_DTYPES, Recipe, load_recipe, modelopt_config

REPORT_FILE = "quantization_report.json"
IMAGE_MIX = 0.25  # a vision-language checkpoint's share of calibration passes over image prompts
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class QuantizeOptions:
    qformat: str
    output: str | Path
    model_dir: str | Path | None = None  # default: the embedded tiny model
    kv_cache_dtype: str | None = None  # "fp8" adds FP8 KV-cache scales
    calib_data: str | Path | None = None  # JSONL with `text`, or `question` + `answer`
    calib_size: int | None = None  # calibration passes (default: the recipe's)
    calib_seq_len: int | None = None  # tokens per pass at most
    block_mix: float | None = None  # share of block (diffusion-draft) passes
    quantize_lm_head: bool = False
    device: str = "cpu"
    dtype: str | None = None  # calibration and comparison dtype (default float32 on CPU, bfloat16 on CUDA)
    seed: int = 0
    compare: bool = True
    eval_data: str | Path | None = None  # JSONL `question` + `answer` (default: the built-in held-out set)
    eval_size: int = 32
    max_new_tokens: int = 128
    block_length: int | None = None  # default: the checkpoint's block_size
    image_mix: float | None = None  # vision-language checkpoints: share of calibration passes with an image (0.25)
    calib_images: str | Path | None = None  # a directory of images for them (default: built-in synthetic ones)
    max_batch: int = 8
    strict: bool = False  # a failed gate is an error (nothing written) instead of a warning
    overwrite: bool = False


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QuantizationError(f"{name} must be a positive integer, got {value!r}")


def check_dimensions(config: NLDConfig, recipe: Recipe, quantize_lm_head: bool) -> None:
    """INT4 packs along the output dimension and scales groups of `group_size` inputs: check every linear."""
    g = recipe.group_size
    if g is None:
        return
    bad = []
    for name, (out, inp) in linear_shapes(config).items():
        if name == "diffusion_head" and not quantize_lm_head:
            continue
        if inp % g or out % 2:
            kind = name.rsplit(".", 1)[-1]
            bad.append(f"{kind} [{out} x {inp}]")
    if bad:
        uniq = list(dict.fromkeys(bad))
        raise QuantizationError(
            f"{recipe.qformat} quantizes groups of {g} inputs: every quantized linear needs an input width that "
            f"is a multiple of {g} and an even output width; these are not: {', '.join(uniq[:6])} "
            f"(hidden_size {config.hidden_size}, heads x head_dim {config.num_attention_heads * config.head_dim}, "
            f"intermediate_size {config.intermediate_size}). Use --qformat fp8 for this model."
        )


def _with_lora(model, lora):
    if lora is not None:
        model.set_lora(lora.layers, lora.scale)
    return model


def _export_dtype(config: NLDConfig) -> torch.dtype:
    return TORCH_DTYPES.get(config.torch_dtype, torch.bfloat16)


def _image_prompts(model_dir: Path, vlm, tokenizer, pictures, device, seq_len: int):
    """(prompt ids, pad positions, image rows, answer ids) of each calibration image, its rows from the tower."""
    from ..prompt import PromptEncoder
    from ..vision.processor import ImageProcessor, ProcessorConfig
    from ..vision.tower import build_vision_encoder

    processor = ImageProcessor(ProcessorConfig.from_checkpoint(model_dir, vlm.vision.patch_size, vlm.spatial_merge_size))
    encoder = PromptEncoder(tokenizer, vlm.text, max(seq_len, 1 << 16), str(model_dir), processor)
    tower = build_vision_encoder(vlm, load_vision_weights(model_dir, vlm), device, torch.float32)
    out = []
    for rec in pictures:
        prompt = encoder.messages([{"role": "user", "content": [{"type": "image", "image": rec.image},
                                                                {"type": "text", "text": rec.question}]}],
                                  local_files=True, field="calibration image")
        with torch.inference_mode():
            rows = tower([img.pixels.to(device) for img in prompt.pixels])
        pads = [p for span in prompt.images for p in span.pad_positions()]
        answer = tokenizer.encode(rec.answer, add_special_tokens=False)
        eos = [vlm.text.eos_token_id] if vlm.text.eos_token_id is not None else []
        out.append((prompt.ids, pads, torch.cat(rows).cpu(), answer + eos))
    del tower
    return out


def quantize_checkpoint(opts: QuantizeOptions, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Quantize `opts.model_dir` into `opts.output`; returns the report (also written as quantization_report.json)."""
    # 1. every input check, before any heavy work --------------------------------------------------
    recipe = load_recipe(opts.qformat)
    if opts.kv_cache_dtype not in (None, *KV_CACHE_DTYPES):
        raise QuantizationError(
            f"unknown --kv-cache-dtype {opts.kv_cache_dtype!r}: choose one of {', '.join(KV_CACHE_DTYPES)}"
        )
    calib_size = recipe.calib_size if opts.calib_size is None else opts.calib_size
    seq_len = recipe.calib_seq_len if opts.calib_seq_len is None else opts.calib_seq_len
    block_mix = recipe.block_mix if opts.block_mix is None else opts.block_mix
    _positive("--calib-size", calib_size)
    _positive("--calib-seq-len", seq_len)
    _positive("--eval-size", opts.eval_size)
    _positive("--max-new-tokens", opts.max_new_tokens)
    _positive("--eval-batch", opts.max_batch)
    if not isinstance(block_mix, (int, float)) or isinstance(block_mix, bool) or not 0.0 <= block_mix <= 1.0:
        raise QuantizationError(f"--block-mix must be a number in [0, 1], got {block_mix!r}")
    model_dir = Path(opts.model_dir) if opts.model_dir is not None else default_model_path()
    output = Path(opts.output)
    config = NLDConfig.from_file(model_dir)
    if is_quantized(config):
        raise QuantizationError(
            f"{model_dir} is already quantized ({config.quantization_config.get('quant_algo')}): "
            "quantize the original checkpoint"
        )
    check_dimensions(config, recipe, opts.quantize_lm_head)
    block_length = opts.block_length or config.block_size
    _positive("--block-length", block_length)
    if block_mix > 0 and seq_len < block_length + 1:
        raise QuantizationError(
            f"--calib-seq-len {seq_len} leaves no room for a context before a block of {block_length}"
        )
    vlm = None
    if config.is_vlm:
        from ..vision.config import VLMConfig

        vlm = VLMConfig.from_file(model_dir)
    image_mix = (IMAGE_MIX if vlm is not None else 0.0) if opts.image_mix is None else opts.image_mix
    if not isinstance(image_mix, (int, float)) or isinstance(image_mix, bool) or not 0.0 <= image_mix < 1.0:
        raise QuantizationError(f"--image-mix must be a number in [0, 1), got {image_mix!r}")
    if vlm is None and (image_mix > 0 or opts.calib_images is not None):
        raise QuantizationError(f"--image-mix / --calib-images need a vision-language checkpoint; {model_dir} is text-only")
    n_images = round(calib_size * image_mix)
    pictures = image_records(n_images, opts.calib_images) if n_images else []
    if output.resolve() == model_dir.resolve():
        raise QuantizationError("--output must differ from --model: the original checkpoint is never overwritten")
    if output.exists() and not opts.overwrite:
        raise QuantizationError(f"{output} already exists: choose another --output or remove it first")
    records = calibration_records(calib_size, opts.calib_data)
    eval_records = []
    if opts.compare:
        eval_records = (
            read_jsonl(opts.eval_data, "evaluation") if opts.eval_data else evaluation_records(opts.eval_size)
        )
        eval_records = eval_records[: opts.eval_size]
    if str(opts.device).startswith("cuda") and not torch.cuda.is_available():
        raise QuantizationError("--device cuda requested but PyTorch sees no GPU: install a CUDA build or use --device cpu")
    dtype = resolve_dtype(opts.dtype, opts.device)
    torch.manual_seed(opts.seed)

    tokenizer = NLDTokenizer(model_dir)
    texts = [encode_record(r, tokenizer, config.eos_token_id) for r in records]
    lora = load_lora(model_dir, config)
    passes = build_passes(
        texts, calib_size - n_images, seq_len, block_mix, block_length, config.mask_token_id, lora is not None,
        opts.seed,
    )
    if pictures:
        log(f"encoding {len(pictures)} calibration images with the vision tower")
        passes += image_passes(_image_prompts(model_dir, vlm, tokenizer, pictures, opts.device, seq_len), n_images,
                               seq_len, block_mix, block_length, config.mask_token_id, lora is not None, opts.seed)
    quant_config = modelopt_config(recipe, opts.quantize_lm_head, opts.kv_cache_dtype)
    raw_config = json.loads((model_dir / "config.json").read_text())

    # 2. the original, measured -----------------------------------------------------------------------
    from .compare import compare, make_examples, snapshot

    examples = make_examples(eval_records, tokenizer, config.eos_token_id)
    measure = dict(max_new_tokens=opts.max_new_tokens, block_length=block_length, max_batch=opts.max_batch)
    reference = None
    if opts.compare:
        log(f"measuring the original on {len(examples)} held-out prompts")
        model = _with_lora(build_model(config, load_weights(model_dir, config), opts.device, dtype), lora)
        reference = snapshot(model, config, tokenizer, examples, **measure)
        del model
        gc.collect()

    # 3. calibrate -----------------------------------------------------------------------------------
    from .calibrate import build_calibration_model, calibrate
    from .export import add_tensors, copy_side_files, export_checkpoint

    kinds = Counter(p.kind for p in passes)
    log(f"calibrating {recipe.qformat} on {len(passes)} passes ({', '.join(f'{v} {k}' for k, v in kinds.items())})")
    model = build_calibration_model(config, load_weights(model_dir, config), lora, opts.device, dtype)
    calibrate(model, quant_config, passes)

    # 4. export, reload as the runtime does, compare, then move into place -------------------------------
    report: dict[str, Any] = {
        "qformat": recipe.qformat,
        "source": str(model_dir),
        "kv_cache_dtype": opts.kv_cache_dtype,
        "lm_head_quantized": opts.quantize_lm_head,
        "calibration": {
            "passes": len(passes),
            **dict(kinds),
            "seq_len": seq_len,
            "block_mix": block_mix,
            "block_length": block_length,
            "data": str(opts.calib_data) if opts.calib_data else "built-in",
        },
    }
    if vlm is not None:
        report["calibration"]["image_passes"] = sum(p.embeds is not None for p in passes)
        report["calibration"]["images"] = str(opts.calib_images) if opts.calib_images else "built-in synthetic"
        report["vision"] = {
            "quantized": False,
            "dtype": str(_export_dtype(config)).removeprefix("torch."),
            "tensors": len(vlm.vision_shapes()),
            "note": "the vision tower and projector are not given to ModelOpt: they are written unquantized in the "
                    "checkpoint's dtype, as TensorRT-LLM keeps multimodal encoders; only the text backbone is "
                    "quantized (calibrated on text and image prompts)",
        }
    with atomic_directory(output, overwrite=opts.overwrite) as tmp:
        log(f"exporting to {output}")
        export_checkpoint(model, tmp, raw_config, _export_dtype(config))
        del model
        gc.collect()
        if vlm is not None:
            add_tensors(tmp, {k: v.to(_export_dtype(config)) for k, v in load_vision_weights(model_dir, vlm).items()},
                        "model-vision.safetensors")
        copy_side_files(model_dir, tmp)
        if reference is not None:
            log("measuring the quantized checkpoint as the runtime loads it")
            qconfig = NLDConfig.from_file(tmp)
            qmodel = _with_lora(load_quantized_model(tmp, qconfig, opts.device, dtype), load_lora(tmp, qconfig))
            quant = snapshot(qmodel, qconfig, tokenizer, examples, **measure)
            report["eval"] = {
                "examples": len(examples),
                **measure,
                "data": str(opts.eval_data) if opts.eval_data else "built-in held-out set",
            }
            report.update(compare(reference, quant, recipe))
            del qmodel
        report["options"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if opts.strict and report.get("warnings"):
            raise QuantizationError("gates failed (--strict, nothing written): " + "; ".join(report["warnings"]))
    return report
