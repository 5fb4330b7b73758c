"""Open a `nld-trt build` output as an executor: TensorRT on a GPU when the plan exists, else ONNX Runtime; a
vision-language model's build also as its vision encoder (vision.plan on a GPU, else vision.onnx), when the
build takes images (`image_refusal`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import NLDConfig
from ..errors import NLDError
from ..checkpoint import ENGINE_FILE
from ..kv.layout import DEFAULT_PAGE_SIZE

# the files of a build (engine/build.py writes them; the build's manifest is checkpoint.ENGINE_FILE)
GRAPH_FILE = "model.onnx"
PLAN_FILE = "nld.plan"
VISION_PLAN_FILE = "vision.plan"


def is_engine_dir(path: Path) -> bool:
    return (path / ENGINE_FILE).is_file()


def open_engine(path: Path, config: NLDConfig, device: str, max_batch: int, max_seq_len: int, max_chunk: int,
                kv_cache_tokens: int | None = None, kv_cache_gb: float | None = None, page_size: int | None = None):
    """The engine's executor. Its KV pages have the build's page size; a TensorRT plan also fixed the pool's
    size at build, ONNX Runtime takes `kv_cache_tokens` / `kv_cache_gb` (default max_batch x max_seq_len)."""
    report = json.loads((path / ENGINE_FILE).read_text())
    limits = report["limits"]
    built = limits.get("page_size")
    if built is None:
        raise NLDError(f"{path} was built for KV-cache slots by an older nld-trt: rebuild it (nld-trt build) for pages")
    if page_size is not None and page_size != built and page_size != DEFAULT_PAGE_SIZE:
        raise NLDError(f"{path} was built with KV pages of {built} positions, not {page_size}: leave --page-size "
                       "out (an engine keeps its build's) or rebuild it")
    if device.startswith("cuda"):
        if not report.get("plan"):
            raise NLDError(f"{path} holds no TensorRT plan: build it on a GPU host with TensorRT (nld-trt build)")
        if kv_cache_tokens is not None or kv_cache_gb is not None:  # the plan's cache shape is fixed: say so
            given = (f"--kv-cache-tokens {kv_cache_tokens}" if kv_cache_tokens is not None
                     else f"--kv-cache-gb {kv_cache_gb}")
            raise NLDError(f"{path}'s TensorRT plan fixed its KV pool at build ({limits.get('kv_cache_tokens', '?')} "
                           f"positions), so {given} cannot apply: leave it out, or rebuild with nld-trt build "
                           "--kv-cache-tokens N")
        from ..executors.trt_executor import TensorRTExecutor

        return TensorRTExecutor(path / PLAN_FILE, config, limits["max_batch"], limits["max_seq_len"],
                                limits["max_block"], report["has_lora"])
    from ..executors.onnx_executor import OnnxExecutor

    if report["dtype"] != "float32":
        raise NLDError(
            f"{path} holds a {report['dtype']} graph for TensorRT; on CPU, ONNX Runtime needs a float32 build "
            "(nld-trt build --dtype float32), or use --device cuda where the plan runs"
        )
    return OnnxExecutor(path / GRAPH_FILE, config, min(max_batch, limits["max_batch"]),
                        min(max_seq_len, limits["max_seq_len"]), min(max_chunk, limits["max_block"]),
                        has_lora=report["has_lora"], page_size=built, kv_cache_tokens=kv_cache_tokens,
                        kv_cache_gb=kv_cache_gb)


def image_refusal(path: Path, device: str) -> str | None:
    """Why the build of a vision-language model at `path` cannot take images on `device` (None: it can). Builds
    of older nld-trt versions have no image-rows input in their text graph; the graph's inputs say so (its
    weights are not read)."""
    import onnx

    from ..executors.graph_io import IMAGE_ROWS

    graph = onnx.load(str(path / GRAPH_FILE), load_external_data=False).graph
    if not any(i.name == IMAGE_ROWS for i in graph.input):
        return "its text graph has no input for image rows (an older nld-trt built it)"
    vision = json.loads((path / ENGINE_FILE).read_text()).get("vision") or {}
    if not vision.get("graph") or not (path / vision["graph"]).is_file():
        return "it holds no vision encoder graph (vision.onnx)"
    if device.startswith("cuda") and not vision.get("plan"):
        return f"it holds no vision encoder plan ({VISION_PLAN_FILE}) for TensorRT"
    return None


def open_vision(path: Path, config, device: str):
    """The build's vision encoder (nld_trt/vision/engine.py): its TensorRT plan on a GPU, else its graph under
    ONNX Runtime. `config`: the build's VLMConfig. Call only where `image_refusal` said None."""
    from ..vision.engine import OnnxVisionEncoder, TensorRTVisionEncoder

    vision = json.loads((path / ENGINE_FILE).read_text())["vision"]
    if device.startswith("cuda"):
        return TensorRTVisionEncoder(path / vision["plan"], config, device)
    return OnnxVisionEncoder(path / vision["graph"], config)
