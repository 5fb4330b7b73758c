"""The TensorRT executor: runs a built plan on a GPU through the same decoding loops.

Thin and standard (deserialize, pick the optimization profile by chunk length, bind torch CUDA tensors,
execute_async_v3). It needs TensorRT >= 10.9 and a GPU, neither of which our CI machines have: this file
has not been executed yet (README, "What has run where").
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import NLDConfig
from ..errors import NLDError
from .base import Executor


class TensorRTExecutor(Executor):
    def __init__(self, plan: str | Path, config: NLDConfig, max_batch: int, max_seq_len: int, max_chunk: int,
                 has_lora: bool, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(config, max_batch, max_seq_len, max_chunk)
        if not torch.cuda.is_available():
            raise NLDError("the TensorRT executor needs a CUDA GPU (use the ONNX Runtime executor on CPU)")
        from ..engine.trt_build import import_tensorrt
        from nld_trt.plugins.trt import register_all

        trt = import_tensorrt()
        register_all()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise NLDError(f"TensorRT could not deserialize {plan} (built with another TensorRT or GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self._has_lora = has_lora
        shape = (max_batch + 1, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.layers = config.num_hidden_layers
        # ping-pong caches: the graph reads past_* and writes present_*; swap after every pass
        self.cache = [[torch.zeros(shape, dtype=dtype, device="cuda") for _ in range(2 * self.layers)] for _ in range(2)]
        self.current = 0

    @property
    def has_lora(self) -> bool:
        return self._has_lora

    @property
    def device(self) -> torch.device:
        return torch.device("cuda")

    def _forward(self, slots, tokens, chunk_lens, block, lora, committed, all_logits):
        b, t = tokens.shape
        self.context.set_optimization_profile_async(0 if t <= self.max_chunk else 1, self.stream.cuda_stream)
        positions = (torch.arange(t, device="cuda").expand(b, t) if all_logits else (chunk_lens - 1)[:, None])
        feeds = {
            "input_ids": tokens, "slots": slots, "committed": committed, "chunk_lens": chunk_lens,
            "block": block, "lora": lora, "logit_positions": positions,
        }
        feeds = {k: v.to(device="cuda", dtype=torch.int32).contiguous() for k, v in feeds.items()}
        past, present = self.cache[self.current], self.cache[1 - self.current]
        for i in range(self.layers):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = past[2 * i], past[2 * i + 1]
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        logits = torch.empty((b, positions.shape[1], self.config.vocab_size), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address("logits", logits.data_ptr())
        for i in range(self.layers):
            self.context.set_tensor_address(f"present_key_{i}", present[2 * i].data_ptr())
            self.context.set_tensor_address(f"present_value_{i}", present[2 * i + 1].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise NLDError("TensorRT execution failed")
        self.stream.synchronize()
        self.current = 1 - self.current
        return logits if all_logits else logits[:, 0]
