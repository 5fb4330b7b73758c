"""The selection kernels (greedy acceptance, dlm fill) against nld_trt.decoding.select, in Triton's CPU
interpreter. Tokens, counts and fill flags must be exact; confidences within 1e-6 (fp32 softmax).
Small tiles (4 rows x 256 vocabulary entries) make every case cross row and vocabulary tile boundaries."""

from __future__ import annotations

import pytest
import torch

from nld_trt.decoding.select import dlm_fill
from nld_trt.plugins.interpret import use_interpreter
from nld_trt.plugins.spec_accept import SelectConfig, dlm_select, spec_accept
from nld_trt.plugins.spec_accept.reference import reference_dlm_select, reference_spec_accept

use_interpreter()  # the kernels run in Triton's CPU interpreter here (see nld_trt.plugins.interpret)

VOCAB = 1000
SMALL = SelectConfig(block_t=4, block_v=256, num_warps=4)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _logits(batch: int, chunk: int, dtype: torch.dtype, seed: int = 0, spread: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, chunk, VOCAB, generator=g) * spread).to(dtype)


def _drafts(logits: torch.Tensor, matches: list[int], seed: int = 1) -> torch.Tensor:
    """Drafts whose row b agrees with the verifier's argmax on its first matches[b] positions."""
    b, t, _ = logits.shape
    greedy = logits.float().argmax(-1)
    draft = torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))
    for row, k in enumerate(matches):
        k = min(k, t - 1)
        draft[row, 1 : k + 1] = greedy[row, :k]
        if k + 1 < t:
            draft[row, k + 1] = (greedy[row, k] + 1) % VOCAB  # a sure mismatch right after
    return draft


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [1, 4, 32])
def test_spec_accept_matches_reference(chunk, dtype):
    logits = _logits(5, chunk, dtype)
    draft = _drafts(logits, [0, 1, 3, 9, 40])
    accepted, next_token = spec_accept(draft, logits, SMALL)
    ref_accepted, ref_next = reference_spec_accept(draft, logits)
    assert accepted.tolist() == ref_accepted.tolist()
    assert next_token.tolist() == ref_next.tolist()


def test_spec_accept_takes_the_first_argmax_on_ties():
    logits = torch.zeros(2, 4, VOCAB)
    logits[:, :, 700] = 1.0
    logits[:, :, 300] = 1.0  # tie across vocabulary tiles: the lower index wins, like torch.argmax
    draft = torch.tensor([[5, 300, 300, 300], [5, 700, 300, 300]])
    accepted, next_token = spec_accept(draft, logits, SMALL)
    assert accepted.tolist() == [4, 1] and next_token.tolist() == [300, 300]


def test_spec_accept_default_config_and_int64_drafts():
    logits = _logits(2, 32, torch.float32, seed=3)
    draft = _drafts(logits, [31, 2]).long()
    accepted, next_token = spec_accept(draft, logits)
    ref_accepted, ref_next = reference_spec_accept(draft, logits)
    assert accepted.tolist() == ref_accepted.tolist() == [32, 3] and next_token.tolist() == ref_next.tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [1, 4, 32])
def test_dlm_select_matches_reference(chunk, dtype):
    logits = _logits(4, chunk, dtype, seed=chunk, spread=4.0)
    g = torch.Generator().manual_seed(7)
    masked = torch.rand(4, chunk, generator=g) < 0.6
    masked[0] = False  # nothing left to fill
    masked[1, 0] = True
    fill_all = torch.tensor([False, False, True, False])
    tokens, conf, fill = dlm_select(logits, masked, 0.5, fill_all, SMALL)
    ref_tokens, ref_conf, ref_fill = reference_dlm_select(logits, masked, 0.5, fill_all)
    assert torch.equal(tokens.long(), ref_tokens)
    assert float((conf - ref_conf).abs().max()) <= 1e-6
    assert torch.equal(fill, ref_fill)
    assert not fill[0].any() and fill[1].any()  # the most confident masked position is always filled


def test_dlm_select_breaks_confidence_ties_by_position():
    logits = torch.zeros(1, 8, VOCAB)
    logits[0, :, 10] = 2.0  # every position equally (un)confident
    masked = torch.tensor([[False, False, True, False, False, True, True, False]])
    _, _, fill = dlm_select(logits, masked, 0.99, config=SMALL)
    assert fill[0].nonzero().flatten().tolist() == [2]


def test_dlm_select_fills_at_exactly_the_threshold():
    """conf >= threshold fills (the reference's comparison), checked on a confidence the kernel computes."""
    logits = _logits(2, 6, torch.float32, seed=11, spread=6.0)
    masked = torch.ones(2, 6, dtype=torch.bool)
    _, conf, _ = dlm_select(logits, masked, 0.5, config=SMALL)
    threshold = float(conf[0].sort().values[2])
    _, _, fill = dlm_select(logits, masked, threshold, config=SMALL)
    expected = torch.stack([dlm_fill(m, c, threshold) for m, c in zip(masked, conf)])
    assert torch.equal(fill, expected) and int(fill[0].sum()) == 4


def test_rejects_mismatched_shapes():
    logits = _logits(2, 4, torch.float32)
    with pytest.raises(ValueError):
        spec_accept(torch.zeros(2, 3, dtype=torch.int64), logits)
    with pytest.raises(ValueError):
        dlm_select(logits, torch.zeros(2, 4, dtype=torch.bool), 0.9, torch.zeros(3, dtype=torch.bool))
