"""Step 3 of the build, on a GPU host with TensorRT >= 10.9: parse the verified graph with the nld plugins
registered, build with one optimization profile for one-token..block chunks and one for prefill chunks, and
serialize the plan. Standard TensorRT Python API only; imported lazily. This step has not run on our
machines (TensorRT cannot be installed there); see the README's support table. tests/test_trt_stand_in.py
checks the calls made here against a stand-in `tensorrt` module.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from ..errors import NLDError
from ..fileutil import write_file

INSTALL_HINT = ("install TensorRT >= 10.9 on a GPU host: pip install tensorrt-cu12 (CUDA 12; tensorrt-cu13 for "
                "CUDA 13), or use NVIDIA's TensorRT container")
CUDA_HINT = ("a CUDA GPU and a CUDA build of PyTorch (pip install torch from the CUDA wheel index) and triton; "
             "the nld:: plugins compile their Triton kernels for the build GPU")


def tensorrt_available() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        importlib.import_module("tensorrt")  # the placeholder wheels import-fail without libnvinfer
    except Exception:
        return False
    return True


def import_tensorrt():
    try:
        import tensorrt as trt
    except Exception as e:
        raise NLDError(f"TensorRT is not usable here ({e}): {INSTALL_HINT}") from None
    version = getattr(trt, "__version__", "")
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        raise NLDError(f"cannot read the TensorRT version ({version!r}): {INSTALL_HINT}") from None
    if (major, minor) < (10, 9):
        raise NLDError(f"TensorRT {trt.__version__} is too old: the nld plugins need >= 10.9 ({INSTALL_HINT})")
    return trt


def cache_layout(options, config):
    """The plan's KV layout: the page pool of options.kv_cache_tokens (default max_batch x max_seq_len)
    positions in pages of options.page_size, bound whole (its shape is fixed in the plan)."""
    import torch

    from ..kv.layout import KVLayout

    return KVLayout.build(config, options.max_seq_len, torch.float32, page_size=options.page_size,
                          tokens=options.kv_cache_tokens or options.max_batch * options.max_seq_len)


def profile_shapes(options, config) -> list[dict[str, tuple[tuple, tuple, tuple]]]:
    """(min, opt, max) shapes per graph input for the decode profile (chunks of 1..max_block tokens, every
    position's logits) and the prefill profile (chunks up to max_seq_len, the last position's logits only).
    Page tables are as wide as a max_seq_len sequence needs; the paged caches are bound whole, so their shape
    is fixed. A vision-language model's graph also takes image rows (nld_trt/engine/onnx_graph.py).
    Plain Python, so tests check it without TensorRT."""
    from ..executors.graph_io import IMAGE_ROWS

    b, s, blk = options.max_batch, options.max_seq_len, options.max_block
    layout = cache_layout(options, config)
    kv, width = layout.shape, layout.table_width  # [pages + 1 (the scratch page), P, Hkv, D]
    profiles = []
    for chunk_max, chunk_opt, logits_max in ((blk, blk, blk), (s, min(512, s), 1)):
        shapes = {
            "input_ids": ((1, 1), (b, chunk_opt), (b, chunk_max)),
            "logit_positions": ((1, 1), (b, min(chunk_opt, logits_max)), (b, logits_max)),
        }
        shapes["page_table"] = ((1, width), (b, width), (b, width))
        for name in ("committed", "chunk_lens", "block", "lora"):
            shapes[name] = ((1,), (b,), (b,))
        if config.is_vlm:  # image rows: one (a pass without images feeds one zero row) up to a row per position
            h = config.hidden_size
            shapes[IMAGE_ROWS] = ((1, h), (1, h), (b * chunk_max, h))
        for i in range(config.num_hidden_layers):
            for k in ("key", "value"):
                shapes[f"past_{k}_{i}"] = (kv, kv, kv)
        profiles.append(shapes)
    return profiles


def enable_aliased_plugin_io(trt, build_config) -> None:
    """nld::write_kv's outputs are aliased to its cache inputs (in-place KV writes): TensorRT 10.x builds that
    only with the preview feature ALIASED_PLUGIN_IO_10_03 on."""
    feature = getattr(getattr(trt, "PreviewFeature", None), "ALIASED_PLUGIN_IO_10_03", None)
    if feature is None:
        raise NLDError(f"this TensorRT ({trt.__version__}) has no aliased plugin I/O (PreviewFeature."
                       f"ALIASED_PLUGIN_IO_10_03), which nld::write_kv needs to write the KV pages in place: "
                       f"{INSTALL_HINT}")
    build_config.set_preview_feature(feature, True)


def network_flags(trt) -> int:
    """Strongly typed (precisions come from the graph: bf16/fp16 weights, FP8 and INT4 DequantizeLinear) and,
    where TensorRT has the flag, the AOT implementation of Python plugins (their PTX goes into the plan)."""
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    prefer_aot = getattr(trt.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS", None)
    if prefer_aot is not None:
        flags |= 1 << int(prefer_aot)
    return flags


def register_plugins() -> None:
    """Register the nld:: plugins with TensorRT before parsing (the parser looks them up by op type and the
    node's plugin_namespace attribute); their aot_impl compiles Triton kernels for this host's GPU."""
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        raise NLDError(f"building the TensorRT plan needs {CUDA_HINT}")
    from nld_trt.plugins import trt as nld_plugins

    try:
        nld_plugins.register_all()
    except RuntimeError as e:  # tensorrt.plugin missing or too old: the message says what to install
        raise NLDError(str(e)) from None


def check_inputs(network, shapes: dict[str, tuple[tuple, tuple, tuple]]) -> None:
    """Every network input has a profile entry of its rank, agreeing with its static dimensions, and every
    profile entry names an input: otherwise TensorRT's own failure comes much later and says less."""
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    missing, unknown = sorted(set(inputs) - set(shapes)), sorted(set(shapes) - set(inputs))
    if missing or unknown:
        raise NLDError(f"the graph's inputs and the optimization profiles disagree (no profile for {missing}, "
                       f"no input named {unknown}): re-export the graph with this nld-trt version")
    for name, dims in inputs.items():
        for bound in shapes[name]:
            if len(bound) != len(dims) or any(d >= 0 and d != x for d, x in zip(dims, bound)):
                raise NLDError(f"profile shape {bound} does not fit the graph input {name} {dims} "
                               "(config.json beside the graph does not match it)")


def parse_graph(trt, graph: Path):
    """A builder, the network parsed from the graph and its parser (which owns the weights: keep it alive)."""
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # no usable GPU / driver: TensorRT's factory returns nullptr
        raise NLDError(f"TensorRT could not create a builder ({e}): it needs {CUDA_HINT}") from None
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)): the weights are external data, found relative to the graph's path
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "see TensorRT's log"
        raise NLDError(f"TensorRT could not parse {graph}: {errors}")
    return builder, network, parser


def build_profiles(trt, builder, network, profiles: list[dict], plan: Path, progress: Callable[[str], None],
                   aliased_io: bool = False) -> None:
    """Check and add the optimization profiles, build, and write the plan atomically; `aliased_io` for a graph
    whose plugins write their inputs in place (the text graph's nld::write_kv)."""
    for shapes in profiles:
        check_inputs(network, shapes)
    build_config = builder.create_builder_config()
    if aliased_io:
        enable_aliased_plugin_io(trt, build_config)
    for index, shapes in enumerate(profiles):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        if build_config.add_optimization_profile(profile) < 0:
            first = next(iter(shapes))
            raise NLDError(f"TensorRT rejected optimization profile {index} ({shapes[first]} for {first})")
    progress("TensorRT: building (this takes minutes for real models)")
    serialized = builder.build_serialized_network(network, build_config)
    if serialized is None:
        raise NLDError("TensorRT failed to build the engine (see its log above)")
    write_file(plan, serialized)


def build_plan(graph: Path, plan: Path, options, progress: Callable[[str], None]) -> None:
    from ..config import NLDConfig

    graph, plan = Path(graph), Path(plan)
    trt = import_tensorrt()
    register_plugins()
    config = NLDConfig.from_file(graph.parent)
    builder, network, _parser = parse_graph(trt, graph)
    build_profiles(trt, builder, network, profile_shapes(options, config), plan, progress, aliased_io=True)


def vision_profile(max_edge: int, cell: int, channels: int = 3) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) pixel_values shapes of the vision encoder's plan: one cell up to the processor's longest
    edge rounded up to whole cells, a side each; 672 pixels (a typical image) as the optimum."""
    top = -(-max_edge // cell) * cell
    opt = min(top, 24 * cell)
    return {"pixel_values": ((1, channels, cell, cell), (1, channels, opt, opt), (1, channels, top, top))}


def build_vision_plan(graph: Path, plan: Path, max_edge: int, cell: int, progress: Callable[[str], None]) -> None:
    """The vision encoder's own plan (a VLM's tower + projector graph, no plugins), beside the text engine."""
    trt = import_tensorrt()
    builder, network, _parser = parse_graph(trt, Path(graph))
    build_profiles(trt, builder, network, [vision_profile(max_edge, cell)], Path(plan), progress)
