"""Step 3 of the build, on a GPU host with TensorRT >= 10.9: parse the verified graph with the nld plugins
registered, build with one optimization profile for one-token chunks and one for block/prefill chunks, and
serialize the plan. Standard TensorRT Python API only; imported lazily. This step has not run on our
machines (TensorRT cannot be installed there); see the README's support table.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from ..errors import NLDError

INSTALL_HINT = "install TensorRT >= 10.9 on a GPU host: pip install tensorrt-cu12 (NVIDIA's index) or use NVIDIA's TensorRT container"


def tensorrt_available() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt  # noqa: F401  (the placeholder wheels import-fail without libnvinfer)
    except Exception:
        return False
    return True


def import_tensorrt():
    try:
        import tensorrt as trt
    except Exception as e:
        raise NLDError(f"TensorRT is not usable here ({e}): {INSTALL_HINT}") from None
    major, minor = (int(x) for x in trt.__version__.split(".")[:2])
    if (major, minor) < (10, 9):
        raise NLDError(f"TensorRT {trt.__version__} is too old: the nld plugins need >= 10.9 ({INSTALL_HINT})")
    return trt


def profile_shapes(options, config) -> list[dict[str, tuple[tuple, tuple, tuple]]]:
    """(min, opt, max) shapes per dynamic input for the decode profile (chunks of 1..max_block tokens)
    and the prefill profile (chunks up to max_seq_len). Plain Python, so tests check it without TensorRT."""
    b, s, blk = options.max_batch, options.max_seq_len, options.max_block
    kv = (b + 1, config.num_key_value_heads, s, config.head_dim)  # + the scratch slot for padding writes
    profiles = []
    for chunk_max, chunk_opt, logits_max in ((blk, blk, blk), (s, min(512, s), 1)):
        shapes = {
            "input_ids": ((1, 1), (b, chunk_opt), (b, chunk_max)),
            "logit_positions": ((1, 1), (b, min(chunk_opt, logits_max)), (b, logits_max)),
        }
        for name in ("slots", "committed", "chunk_lens", "block", "lora"):
            shapes[name] = ((1,), (b,), (b,))
        for i in range(config.num_hidden_layers):
            for k in ("key", "value"):
                shapes[f"past_{k}_{i}"] = (kv, kv, kv)
        profiles.append(shapes)
    return profiles


def build_plan(graph: Path, plan: Path, options, progress: Callable[[str], None]) -> None:
    trt = import_tensorrt()
    from nld_trt.plugins.trt import register_all

    from ..config import NLDConfig

    register_all()
    config = NLDConfig.from_file(graph.parent)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # strongly typed: precisions come from the graph (bf16/fp16 weights, FP8 and INT4 DequantizeLinear)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise NLDError(f"TensorRT could not parse {graph}: {errors}")
    build_config = builder.create_builder_config()
    for shapes in profile_shapes(options, config):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        build_config.add_optimization_profile(profile)
    progress("TensorRT: building (this takes minutes for real models)")
    serialized = builder.build_serialized_network(network, build_config)
    if serialized is None:
        raise NLDError("TensorRT failed to build the engine (see its log above)")
    plan.write_bytes(serialized)
