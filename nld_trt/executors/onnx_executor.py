"""The ONNX Runtime executor: runs the exported engine graph (float32) on CPU through the same decoding
loops and page tables, which is how the graph handed to TensorRT is proven right on machines without
TensorRT. A vision-language model's graph takes image rows (graph_io.image_feeds); a graph without that
input (an older build) takes text chunks only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import NLDConfig
from ..errors import NLDError
from ..kv.layout import DEFAULT_PAGE_SIZE, KVLayout
from .base import Executor
from .graph_io import IMAGE_ROWS, cache_names, image_feeds, input_feeds, present_name


class OnnxExecutor(Executor):
    """`page_size` must be the graph's (its caches' third dimension); the pool's size is free (`kv_cache_tokens`,
    default max_batch x max_seq_len): ONNX Runtime takes any number of pages."""

    full_tables = True  # the graph's page_table input, as TensorRT's profiles fix it

    def __init__(self, graph: str | Path, config: NLDConfig, max_batch: int = 8, max_seq_len: int = 2048,
                 max_chunk: int = 128, has_lora: bool = False, threads: int = 1, page_size: int = DEFAULT_PAGE_SIZE,
                 kv_cache_tokens: int | None = None, kv_cache_gb: float | None = None) -> None:
        layout = KVLayout.build(config, max_seq_len, torch.float32, tokens=kv_cache_tokens, gb=kv_cache_gb,
                                page_size=page_size, default_tokens=max_batch * max_seq_len)
        super().__init__(config, layout, max_batch, max_chunk)
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - both are dependencies
            raise NLDError(f"the ONNX Runtime executor needs onnx and onnxruntime ({e}): pip install nld-trt") from None
        from ..engine.custom_ops import for_onnxruntime, register

        model = onnx.load(str(graph))
        cache = model.graph.input[-1].type.tensor_type
        if cache.elem_type != onnx.TensorProto.FLOAT:
            raise NLDError(
                f"{graph} is not a float32 graph: ONNX Runtime on CPU runs the float32 export "
                "(nld-trt build --dtype float32); bf16/fp16 graphs are for TensorRT"
            )
        if cache.shape.dim[1].dim_value != page_size:
            raise NLDError(f"{graph} has KV pages of {cache.shape.dim[1].dim_value} positions, not {page_size}: "
                           "open it with the page size it was built with")
        options = ort.SessionOptions()
        options.register_custom_ops_library(register())
        options.intra_op_num_threads = threads
        # ONNX Runtime fuses INT4 DequantizeLinear + MatMul into MatMulNBits and, by default, quantizes the
        # activations to int8 there (accuracy level 4): not the W4A16 model. Level 1 keeps float32 compute.
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        self.session = ort.InferenceSession(
            for_onnxruntime(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self._has_lora = has_lora
        self._image_rows = any(i.name == IMAGE_ROWS for i in model.graph.input)
        self.names = cache_names(config.num_hidden_layers)
        self.cache = {n: np.zeros(layout.shape, np.float32) for n in self.names}

    @property
    def has_lora(self) -> bool:
        return self._has_lora

    @property
    def takes_embeds(self) -> bool:
        return self._image_rows

    def _forward(self, tokens, tables, chunk_lens, block, lora, committed, all_logits, embeds=()):
        rows = None
        if self._image_rows:
            tokens, rows = image_feeds(tokens, embeds, self.config.vocab_size, self.config.hidden_size, torch.float32)
        feeds = {k: v.numpy() for k, v in input_feeds(tokens, tables, chunk_lens, block, lora, committed,
                                                      all_logits).items()}
        if rows is not None:
            feeds[IMAGE_ROWS] = rows.numpy()
        feeds.update(self.cache)
        # ONNX Runtime's custom operators return new arrays: the updated pages come back as present_*
        logits, *present = self.session.run(["logits", *map(present_name, self.names)], feeds)
        self.cache = dict(zip(self.names, present))
        out = torch.from_numpy(logits)
        return out if all_logits else out[:, 0]
