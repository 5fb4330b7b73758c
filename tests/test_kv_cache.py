"""The KV cache and the chunk pass: incremental = full recompute, uncommitted passes leave no trace,
rows of a batch are independent, and the LoRA drafter touches only the rows that ask for it."""

from __future__ import annotations

import pytest
import torch

from nld_trt.attention import chunk_attention_mask
from nld_trt.executors import Chunk, TorchExecutor
from nld_trt.executors.base import PassBatch, PassRow
from nld_trt.model import NLDModel, init_weights
from nld_trt.tiny import random_lora, tiny_config
from paged import Pager

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    """float64: the cache must equal a full recompute up to rounding, and float32 rounding after 150
    positions depends on the CPU's GEMM blocking (1.03e-5 on an AMX machine); float64 makes TOL a real check."""
    m = init_weights(NLDModel(tiny_config()), std=0.15, seed=11).double().eval()
    lora = random_lora(m.config, rank=4, seed=5, std=0.3)
    m.set_lora(lora.layers, lora.scale)
    return m


def reference(model: NLDModel, prefix: list[int], chunk: list[int], block: bool, lora: bool = False) -> torch.Tensor:
    """Logits of `chunk` after `prefix`, recomputed from scratch with an explicit mask (no cache)."""
    tokens = torch.tensor([prefix + chunk])
    n, t = len(prefix), len(prefix) + len(chunk)
    q = torch.arange(t)[:, None]
    k = torch.arange(t)[None, :]
    visible = (k <= q) | (torch.tensor(block) & (q >= n) & (k >= n))
    with torch.no_grad():
        lora_rows = torch.tensor([[False] * n + [lora] * len(chunk)])  # the cache holds plain K/V
        h = model(tokens, torch.arange(t)[None], visible[None, None], lora_rows=lora_rows)
        return model.logits(h)[0, n:]


def test_mask_semantics_match_the_spec():
    committed, lens = torch.tensor([2, 0]), torch.tensor([3, 2])
    m = chunk_attention_mask(committed, lens, torch.tensor([False, True]), 3, 5)[:, 0]
    causal = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    block = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(m[0], causal)
    assert torch.equal(m[1], block)  # padding query row 2 sees the real chunk only


def test_incremental_causal_decoding_equals_full_recompute(model):
    ex = Pager(TorchExecutor(model, max_batch=1, max_seq_len=160, page_size=16))
    slot = ex.allocate()
    seq = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    full = reference(model, [], seq, block=False)
    ex.forward([slot], [Chunk(seq[:5])])
    ex.commit(slot, 5)
    for i in range(5, 150):  # crosses original_max_position_embeddings (64) twice, and page boundaries
        logits = ex.forward([slot], [Chunk([seq[i]])])[0, 0]
        ex.commit(slot, 1)
        assert (logits - full[i]).abs().max().item() <= TOL


def test_block_pass_sees_whole_chunk_and_leaves_committed_state_unchanged(model):
    ex = Pager(TorchExecutor(model, max_batch=1, max_seq_len=64, page_size=8))
    slot = ex.allocate()
    prefix, probe = list(range(3, 20)), [200, 201]
    ex.forward([slot], [Chunk(prefix)])
    ex.commit(slot, len(prefix))
    before = ex.forward([slot], [Chunk(probe)])[0]
    block_logits = ex.forward([slot], [Chunk([7, 100, 100, 100, 9], block=True)])[0]
    assert slot.length == len(prefix)
    after = ex.forward([slot], [Chunk(probe)])[0]
    assert torch.equal(before, after)
    expected = reference(model, prefix, [7, 100, 100, 100, 9], block=True)
    assert (block_logits - expected).abs().max().item() <= TOL
    causal = reference(model, prefix, [7, 100, 100, 100, 9], block=False)
    assert (block_logits[0] - causal[0]).abs().max().item() > 1e-3  # position 0 sees later chunk tokens


def test_commit_fewer_rolls_back_the_rest(model):
    ex = Pager(TorchExecutor(model, max_batch=1, max_seq_len=64, page_size=4))
    slot = ex.allocate()
    ex.forward([slot], [Chunk([1, 5, 6, 7, 8, 9])])
    ex.commit(slot, 3)  # keep 1 5 6; 7 8 9 are overwritten by the next pass
    logits = ex.forward([slot], [Chunk([40, 41])])[0]
    assert (logits - reference(model, [1, 5, 6], [40, 41], block=False)).abs().max().item() <= TOL


def test_batch_rows_with_own_lengths_patterns_and_lora_equal_single_rows(model):
    prefixes = [list(range(10, 40)), [3, 4], list(range(50, 59))]
    chunks = [Chunk([5, 100, 100, 100], block=True, lora=True), Chunk([6]), Chunk([8, 9, 10], block=False)]
    ex = Pager(TorchExecutor(model, max_batch=4, max_seq_len=64, page_size=4))
    slots = [ex.allocate() for _ in prefixes]
    logits = None
    for s, p in zip(slots[::-1], prefixes[::-1]):  # pages taken in another order than the rows' order
        ex.forward([s], [Chunk(p)])
        ex.commit(s, len(p))
    logits = ex.forward(slots, chunks)
    assert logits.shape[:2] == (3, 4)
    for i, (p, c) in enumerate(zip(prefixes, chunks)):
        expected = reference(model, p, c.tokens, c.block, c.lora)
        assert (logits[i, : len(c.tokens)] - expected).abs().max().item() <= TOL


def test_lora_is_the_merged_o_proj_weight_and_only_where_asked(model):
    prefix, chunk = [1, 2, 3], [4, 100, 100]
    with_lora = reference(model, prefix, chunk, block=True, lora=True)
    without = reference(model, prefix, chunk, block=True, lora=False)
    assert (with_lora - without).abs().max().item() > 1e-3
    prefix = []  # the merged model applies the adapter everywhere
    with_lora = reference(model, prefix, chunk, block=True, lora=True)
    merged = init_weights(NLDModel(model.config), std=0.15, seed=11).eval()
    with torch.no_grad():
        for layer, ref in zip(merged.encoder.layers, model.encoder.layers):
            lo = ref.self_attn.lora
            layer.self_attn.o_proj.weight += lo.scale * lo.B @ lo.A
    assert (reference(merged, prefix, chunk, block=True) - with_lora).abs().max().item() <= TOL


def test_last_only_logits_are_each_rows_last_real_position(model):
    ex = Pager(TorchExecutor(model, max_batch=2, max_seq_len=64))
    a, b = ex.allocate(), ex.allocate()
    full = ex.forward([a, b], [Chunk([1, 2, 3, 4, 5]), Chunk([6, 7])])
    last = ex.forward([a, b], [Chunk([1, 2, 3, 4, 5]), Chunk([6, 7])], all_logits=False)
    assert (last[0] - full[0, 4]).abs().max().item() <= TOL
    assert (last[1] - full[1, 1]).abs().max().item() <= TOL


def test_chunk_past_the_cache_end_is_refused(model):
    from nld_trt.errors import GenerationError

    ex = TorchExecutor(model, max_batch=1, max_seq_len=8)
    with pytest.raises(GenerationError, match="does not fit in the KV cache"):
        ex.forward(PassBatch([PassRow(Chunk(list(range(9))), 0, list(range(ex.layout.pages)))]))
