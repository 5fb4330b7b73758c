"""The PyTorch executor's kernel path (the fused Triton kernels it uses on CUDA), run here under Triton's
interpreter, decodes exactly what the reference path decodes."""

from __future__ import annotations

import pytest

from nld_trt.decoding import SEQUENCE_TYPES, GenerationParams, run
from nld_trt.executors import TorchExecutor
from nld_trt.plugins.interpret import use_interpreter


@pytest.mark.parametrize("mode", ["ar", "dlm", "linear_spec"])
def test_kernel_path_decodes_like_the_reference_path(tiny, mode):
    use_interpreter()
    prompts = [[1, 40, 41, 42], [1, 7, 8, 9, 10, 11, 12]]
    params = GenerationParams(mode=mode, max_new_tokens=8, block_length=4, eos_token_ids=()).resolved(tiny.config)
    outs = []
    for kernels in (False, True):
        ex = TorchExecutor(tiny.model, max_batch=2, max_seq_len=64, kernels=kernels)
        seqs = run(ex, [SEQUENCE_TYPES[mode](p, params, tiny.config, 0) for p in prompts])
        outs.append([s.out for s in seqs])
    assert outs[0] == outs[1]
