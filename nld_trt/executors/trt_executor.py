"""The TensorRT executor: runs a built plan on a GPU through the same decoding loops.

Thin and standard (deserialize, pick the optimization profile that holds the pass's shapes, bind torch CUDA
tensors by name, execute_async_v3). It feeds the graph exactly what the ONNX Runtime executor feeds it
(`graph_io.input_feeds`, and a VLM plan's image rows, `graph_io.image_feeds`). The paged cache is one set
of tensors whose shape the plan fixed at build (its pages, page size and dtype: the executor's layout);
`nld::write_kv` writes each pass's K/V into it in place (its present_* outputs are aliased to the past_*
inputs), so past_* and present_* are bound to the same memory and nothing is copied. The nld:: plugins are
AOT plugins: their kernels are inside the plan, so nothing is registered at run time.

It needs TensorRT >= 10.9 and a GPU, neither of which our CI machines have: this file has run only against
the stand-in `tensorrt` of tests/test_trt_stand_in.py (README, "What has run where").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import NLDConfig
from ..errors import NLDError
from ..kv.layout import KVLayout
from .base import Executor
from .graph_io import IMAGE_ROWS, INPUTS, cache_names, image_feeds, input_feeds, present_name

# tensorrt.DataType member names -> torch dtypes (matched by name, so this runs without TensorRT)
TORCH_DTYPES = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "FP8": torch.float8_e4m3fn,
    "INT8": torch.int8, "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool,
}
CUDA_MISSING = (
    "the TensorRT executor needs a CUDA GPU and a CUDA build of PyTorch (torch.cuda.is_available() is False "
    "here): install the CUDA torch wheel and tensorrt-cu12 on a GPU host, or run the engine's float32 ONNX "
    "graph on CPU through ONNX Runtime (--device cpu)"
)


def torch_dtype(trt_dtype) -> torch.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise NLDError(f"the plan has a tensor of TensorRT type {name}, which has no torch dtype") from None


def pick_profile(ranges: list[dict[str, tuple[tuple, tuple]]], shapes: dict[str, tuple]) -> int:
    """The first optimization profile whose (min, max) holds every given input shape."""
    def holds(bounds: tuple[tuple, tuple], shape: tuple) -> bool:
        lo, hi = bounds
        return len(lo) == len(shape) and all(a <= x <= b for a, x, b in zip(lo, shape, hi))

    for index, profile in enumerate(ranges):
        if all(holds(profile[name], shape) for name, shape in shapes.items()):
            return index
    have = "; ".join(f"profile {i}: input_ids {r['input_ids']}, logit_positions {r['logit_positions']}"
                     for i, r in enumerate(ranges))
    raise NLDError(f"no optimization profile of the plan takes input_ids {shapes['input_ids']} with logit_positions "
                   f"{shapes['logit_positions']} ({have}); rebuild with larger --max-batch / --max-block")


@dataclass
class LoadedPlan:
    """A deserialized plan with the TensorRT objects it needs alive (its runtime and logger)."""

    trt: Any
    logger: Any
    runtime: Any
    engine: Any

    @classmethod
    def load(cls, plan: str | Path, device: torch.device) -> LoadedPlan:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise NLDError(CUDA_MISSING)
        from ..engine.trt_build import import_tensorrt

        trt = import_tensorrt()
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if engine is None:
            raise NLDError(f"TensorRT could not deserialize {plan}: plans are tied to the TensorRT version and GPU "
                           "they were built with; rebuild it here (nld-trt build)")
        return cls(trt, logger, runtime, engine)

    @property
    def names(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]


class TensorRTExecutor(Executor):
    full_tables = True  # the plan's page_table input has the layout's width
    def __init__(self, plan: str | Path, config: NLDConfig, max_batch: int, max_seq_len: int, max_chunk: int,
                 has_lora: bool, device: str = "cuda") -> None:
        """`device` is cuda for any real plan; tests/test_trt_stand_in.py passes cpu with its stand-in TensorRT."""
        self._device = torch.device(device)
        cuda = self._device.type == "cuda"
        self.plan = LoadedPlan.load(plan, self._device)
        trt, self.engine = self.plan.trt, self.plan.engine
        names = self.plan.names
        inputs = {n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        self.outputs = [n for n in names if n not in inputs]
        self.past = cache_names(config.num_hidden_layers)
        self.present = {p: present_name(p) for p in self.past}
        want_in, want_out = set(INPUTS) | set(self.past), {"logits", *self.present.values()}
        self._image_rows = IMAGE_ROWS in inputs  # a VLM's plan (one built by an older nld-trt has no such input)
        if inputs - {IMAGE_ROWS} != want_in or not want_out <= set(self.outputs):
            raise NLDError(f"{plan} is not a plan of this model's graph (inputs differ by "
                           f"{sorted(inputs ^ want_in)}, outputs missing {sorted(want_out - set(self.outputs))})")
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        wrong = [n for n in INPUTS if self.dtypes[n] != torch.int32] + [n for n in ("logits",)
                                                                        if self.dtypes[n] != torch.float32]
        if wrong:
            raise NLDError(f"{plan} is not a plan of this nld-trt's graph: {wrong} have other types than "
                           "the graph's (int32 indices, float32 logits)")
        self.ranges = []
        for p in range(self.engine.num_optimization_profiles):
            bounds = {n: self.engine.get_tensor_profile_shape(n, p) for n in (*INPUTS, self.past[0])
                      + ((IMAGE_ROWS,) if self._image_rows else ())}
            self.ranges.append({n: (tuple(lo), tuple(hi)) for n, (lo, _, hi) in bounds.items()})
        shape = self.ranges[0][self.past[0]][0]  # [pages + 1, P, Hkv, D], fixed at build
        want = (config.num_key_value_heads, config.head_dim)
        if len(shape) != 4 or (shape[2], shape[3]) != want or any(
                r[self.past[0]] != (shape, shape) for r in self.ranges):
            raise NLDError(f"{plan} binds KV caches of shapes {[r[self.past[0]] for r in self.ranges]}: a plan of this "
                           f"nld-trt binds one fixed [pages + 1, page size, {want[0]}, {want[1]}] cache; rebuild it")
        width = self.ranges[0]["page_table"][1][1]
        if max_seq_len > width * shape[1]:
            raise NLDError(f"{plan} takes page tables of {width} pages of {shape[1]}: sequences of at most "
                           f"{width * shape[1]} positions, not max_seq_len {max_seq_len}; rebuild it with a larger "
                           "--max-seq-len")
        layout = KVLayout(config.num_hidden_layers, shape[2], shape[3], shape[0] - 1, shape[1], max_seq_len,
                          self.dtypes[self.past[0]])
        if layout.pages_for(layout.max_seq_len) > layout.pages:
            raise NLDError(f"{plan} holds {layout.pages} KV pages, fewer than one sequence of {layout.max_seq_len} "
                           "positions needs: rebuild it with a larger --kv-cache-tokens")
        super().__init__(config, layout, max_batch, max_chunk)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise NLDError(f"TensorRT could not create an execution context for {plan} (out of GPU memory?)")
        self.stream = torch.cuda.Stream() if cuda else None  # enqueueV3 on the default stream syncs extra
        self._has_lora = has_lora
        # one cache: the plugins write in place (past_* and present_* are bound to the same memory)
        self.cache = {n: torch.zeros(shape, dtype=layout.dtype, device=self._device) for n in self.past}
        self.profile: int | None = None

    @property
    def has_lora(self) -> bool:
        return self._has_lora

    @property
    def takes_embeds(self) -> bool:
        return self._image_rows

    @property
    def device(self) -> torch.device:
        return self._device

    def _forward(self, tokens, tables, chunk_lens, block, lora, committed, all_logits, embeds=()):
        rows = None
        if self._image_rows:
            tokens, rows = image_feeds(tokens, embeds, self.config.vocab_size, self.config.hidden_size,
                                       self.dtypes[IMAGE_ROWS])
        feeds = input_feeds(tokens, tables, chunk_lens, block, lora, committed, all_logits)
        if rows is not None:
            feeds[IMAGE_ROWS] = rows
        profile = pick_profile(self.ranges, {n: tuple(v.shape) for n, v in feeds.items()})
        stream = self.stream.cuda_stream if self.stream is not None else 0
        if profile != self.profile:
            if not self.context.set_optimization_profile_async(profile, stream):
                raise NLDError(f"TensorRT could not switch to optimization profile {profile}")
            self.profile = profile
        feeds.update(self.cache)
        for name, tensor in feeds.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise NLDError(f"TensorRT rejected shape {tuple(tensor.shape)} for input {name} (profile {profile})")
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}  # every output needs an address, also those the loops do not read (the on-GPU selections)
        for name in self.outputs:
            if name.startswith("present_"):
                tensor = self.cache[name.replace("present_", "past_", 1)]  # aliased: written in place
            else:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise NLDError(f"TensorRT could not infer the shape of output {name} ({shape})")
                tensor = torch.empty(shape, dtype=self.dtypes[name], device=self._device)
            self.context.set_tensor_address(name, tensor.data_ptr())
            outputs[name] = tensor
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())  # the inputs were written on the current stream
        if not self.context.execute_async_v3(stream):
            raise NLDError("TensorRT execution failed (see its log)")
        if self.stream is not None:
            self.stream.synchronize()
        logits = outputs["logits"]
        return logits if all_logits else logits[:, 0]
