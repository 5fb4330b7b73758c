"""`nld-trt build`: checkpoint -> ONNX graph (step 1) -> verified by ONNX Runtime (step 2) -> TensorRT plan
(step 3, only where TensorRT is installed). The output directory is written whole or not at all.

Output layout: engine.json (what was built, limits, verification results), config.json and the tokenizer
files of the checkpoint, model.onnx (+ model.onnx.data, the weights as external data) in the requested
dtype, and nld.plan when TensorRT built it. A vision-language checkpoint adds its vision encoder (tower +
projector) as its own graph, vision.onnx (dynamic image size, nld_trt/vision/onnx_export.py), verified under
ONNX Runtime against the PyTorch encoder, and vision.plan beside nld.plan; its text graph then takes the
encoder's rows through its `image_rows` input (nld_trt/engine/onnx_graph.py), so `nld_trt.load` of the build
runs image prompts through both graphs (nld_trt/engine/loader.py).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch

from ..checkpoint import ENGINE_FILE, check_model_dir
from ..errors import NLDError
from ..fileutil import atomic_directory
from ..kv.layout import DEFAULT_PAGE_SIZE
from .loader import GRAPH_FILE, PLAN_FILE, VISION_PLAN_FILE
COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "hf_quant_config.json", "preprocessor_config.json")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32}
VERIFY_PROMPTS = [[1, 5, 17, 33, 40, 41, 60], [1, 90, 91], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]

TENSORRT_MISSING = (
    "TensorRT is not installed here, so the build stopped after the verified ONNX graph ({graph}). "
    "On a GPU host with TensorRT >= 10.9 (pip install tensorrt-cu12, or NVIDIA's TensorRT container), run "
    "the same `nld-trt build` command (or `python build_engine.py ...`) to build the plan; the graph in this "
    "directory already serves on CPU through ONNX Runtime (`nld-trt package --engine {output}`)."
)


@dataclass
class BuildOptions:
    checkpoint: Path
    output: Path
    max_batch: int = 8
    max_seq_len: int = 2048
    max_block: int = 32
    page_size: int = DEFAULT_PAGE_SIZE  # KV-cache positions per page
    kv_cache_tokens: int | None = None  # the TensorRT plan's page pool (default max_batch x max_seq_len positions)
    dtype: str = "bf16"
    onnx_only: bool = False
    verify: bool = True
    verify_tokens: int = 24
    overwrite: bool = False


@dataclass
class BuildReport:
    graph: str
    dtype: str
    nodes: int
    custom_nodes: list[str]
    quantization: str | None
    has_lora: bool
    limits: dict
    verification: dict = field(default_factory=dict)
    plan: str | None = None
    vision: dict | None = None  # a VLM's vision encoder graph: file, dtype, verification, plan
    seconds: float = 0.0


def export_to(directory: Path, model, dtype: torch.dtype, page_size: int, name: str = GRAPH_FILE) -> Path:
    """Write the graph with its weights as external data (graphs beyond 2 GB) and check it."""
    from .onnx_graph import export_graph

    proto = export_graph(model, dtype, page_size)
    path = directory / name
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                     location=name + ".data", size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def verify_prompts(nld) -> list:
    """The verification prompts: token ids and, for a vision-language model, the first of them after a random
    image (so the text graph's image-rows input is verified too)."""
    vocab = nld.config.vocab_size
    ids = [[t % vocab for t in p] for p in VERIFY_PROMPTS]
    prompts = [nld.prompts.token_ids(p) for p in ids]
    if nld.vlm is not None:
        import numpy as np
        from PIL import Image

        pixels = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
        prompts.append(nld.prompts.with_images(ids[0], [("the verification image", Image.fromarray(pixels))],
                                               chat=False))
    return prompts


def verify_graph(nld, graph: Path, tokens: int, progress: Callable[[str], None], page_size: int) -> dict:
    """Greedy tokens of every mode through ONNX Runtime equal the PyTorch executor's (image prompts with the
    PyTorch encoder's rows)."""
    from ..decoding import SEQUENCE_TYPES, GenerationParams, run
    from ..executors.onnx_executor import OnnxExecutor

    prompts = verify_prompts(nld)
    limits = dict(max_batch=len(prompts), max_seq_len=256, max_chunk=nld.executor.max_chunk)
    ort_ex = OnnxExecutor(graph, nld.config, has_lora=nld.executor.has_lora, page_size=page_size, **limits)
    results = {}
    for mode in ("ar", "dlm", "linear_spec"):
        params = GenerationParams(mode=mode, max_new_tokens=tokens, block_length=8).resolved(nld.config)
        ref, seqs = ([SEQUENCE_TYPES[mode](p.ids, params, nld.config, 0, images=nld.bind_images(p)) for p in prompts]
                     for _ in range(2))
        run(nld.executor, ref, pages=nld.pages)
        run(ort_ex, seqs)
        same = [s.error is None and s.out == r.out for s, r in zip(seqs, ref)]
        results[mode] = {"prompts": len(prompts), "identical": sum(same),
                         "with_images": sum(1 for p in prompts if p.images)}
        progress(f"verify {mode}: {sum(same)}/{len(prompts)} greedy outputs identical to the PyTorch executor")
        if not all(same) or any(r.error for r in ref):
            raise NLDError(
                f"ONNX Runtime and PyTorch disagree in mode {mode} ({sum(same)}/{len(prompts)} identical): "
                "the exported graph is wrong; nothing was written"
            )
    return results


def build_vision_graph(nld, directory: Path, dtype: torch.dtype, options: BuildOptions,
                       progress: Callable[[str], None]) -> dict:
    """Step 1-2 for a VLM's vision encoder: its own graph in `dtype`, verified (through its float32 twin where
    `dtype` is not float32) under ONNX Runtime against the PyTorch encoder."""
    from ..vision.onnx_export import VISION_GRAPH, export_vision_graph, verify_vision_graph

    encoder = nld.image_encoder.encoder
    progress(f"step 1/3: export the vision encoder's {options.dtype} graph (dynamic image size)")
    graph = export_vision_graph(encoder, directory, dtype)
    proto = onnx.load(str(graph), load_external_data=False)
    vision = {"graph": VISION_GRAPH, "dtype": options.dtype, "nodes": len(proto.graph.node),
              "inputs": ["pixel_values [1, 3, H, W]"], "outputs": ["image_rows [H/28 * W/28, hidden]"]}
    if options.verify:
        progress("step 2/3: verify the vision graph with ONNX Runtime against the PyTorch encoder")
        if dtype == torch.float32:
            vision["verification"] = verify_vision_graph(graph, encoder, progress)
        else:
            scratch = directory / ".verify-vision"
            scratch.mkdir()
            vision["verification"] = verify_vision_graph(export_vision_graph(encoder, scratch, torch.float32),
                                                         encoder, progress)
            vision["verification"]["graph"] = f"float32 twin of the {options.dtype} graph"
            shutil.rmtree(scratch)
    return vision


def build(options: BuildOptions, progress: Callable[[str], None] = print) -> BuildReport:
    from ..runtime import load

    start = time.perf_counter()
    if options.dtype not in DTYPES:
        raise NLDError(f"unknown dtype {options.dtype!r}: use one of {', '.join(DTYPES)}")
    for name in ("max_batch", "max_seq_len", "max_block", "page_size"):
        if getattr(options, name) < 1:
            raise NLDError(f"--{name.replace('_', '-')} must be a positive integer")
    kv_tokens = options.kv_cache_tokens or options.max_batch * options.max_seq_len
    if -(-kv_tokens // options.page_size) < -(-options.max_seq_len // options.page_size):
        raise NLDError(f"--kv-cache-tokens {kv_tokens} holds fewer pages than one sequence of --max-seq-len "
                       f"{options.max_seq_len} needs")
    check_model_dir(options.checkpoint)
    progress(f"load {options.checkpoint}")
    nld = load(options.checkpoint, max_batch=len(VERIFY_PROMPTS), max_seq_len=256, dtype="float32",
               page_size=options.page_size)
    dtype = DTYPES[options.dtype]
    with atomic_directory(options.output, overwrite=options.overwrite) as tmp:
        progress(f"step 1/3: export the {options.dtype} graph")
        graph = export_to(tmp, nld.model, dtype, options.page_size)
        proto = onnx.load(str(graph), load_external_data=False)
        custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
        report = BuildReport(
            graph=GRAPH_FILE, dtype=options.dtype, nodes=len(proto.graph.node), custom_nodes=custom,
            quantization=(nld.config.quantization_config or {}).get("quant_algo"),
            has_lora=nld.executor.has_lora,
            limits={"max_batch": options.max_batch, "max_seq_len": options.max_seq_len, "max_block": options.max_block,
                    "page_size": options.page_size, "kv_cache_tokens": kv_tokens},
        )
        if options.verify:
            progress("step 2/3: verify the graph with ONNX Runtime against the PyTorch executor")
            if dtype == torch.float32:
                report.verification = verify_graph(nld, graph, options.verify_tokens, progress, options.page_size)
            else:  # ONNX Runtime on CPU runs float32: verify the same builder's float32 graph
                scratch = tmp / ".verify"
                scratch.mkdir()
                report.verification = verify_graph(nld, export_to(scratch, nld.model, torch.float32, options.page_size),
                                                   options.verify_tokens, progress, options.page_size)
                report.verification["graph"] = f"float32 twin of the {options.dtype} graph"
                shutil.rmtree(scratch)
        if nld.vlm is not None:
            report.vision = build_vision_graph(nld, tmp, dtype, options, progress)
        for name in COPIED_FILES:
            if (options.checkpoint / name).is_file():
                shutil.copy2(options.checkpoint / name, tmp / name)
        tensorrt_message = None
        if not options.onnx_only:
            from .trt_build import tensorrt_available

            if tensorrt_available():
                progress("step 3/3: build the TensorRT plan")
                from .trt_build import build_plan, build_vision_plan

                build_plan(tmp / GRAPH_FILE, tmp / PLAN_FILE, options, progress)
                report.plan = PLAN_FILE
                if report.vision is not None:
                    progress("step 3/3: build the vision encoder's TensorRT plan")
                    processor = nld.prompts.processor.config
                    build_vision_plan(tmp / report.vision["graph"], tmp / VISION_PLAN_FILE, processor.longest_edge,
                                      processor.cell, progress)
                    report.vision["plan"] = VISION_PLAN_FILE
            else:
                tensorrt_message = TENSORRT_MISSING.format(graph=options.output / GRAPH_FILE, output=options.output)
        report.seconds = round(time.perf_counter() - start, 2)
        (tmp / ENGINE_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    if tensorrt_message:
        progress(tensorrt_message)
    return report
