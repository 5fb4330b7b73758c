"""The training recipe: the data generator, the joint objective's batch layout and attention mask, and a
few steps of `scripts/train_tiny_nld.py --tiny` writing a checkpoint that loads and generates."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from nld_trt.model import NLDModel, init_weights
from nld_trt.tiny import EOS_ID, MASK_ID, tiny_config
from nld_trt.training import data
from nld_trt.training.objective import (
    CLEAN,
    IGNORE,
    NOISY,
    PAD,
    Example,
    MaskSchedule,
    draft_loss,
    joint_loss,
    make_batch,
)

ROOT = Path(__file__).resolve().parents[1]


# Data ---------------------------------------------------------------------------------------------

def test_generator_is_seeded_and_solutions_are_arithmetic():
    a = list(itertools.islice(data.generate(5), 300))
    assert a == list(itertools.islice(data.generate(5), 300))
    assert a != list(itertools.islice(data.generate(6), 300))
    for p in a:
        assert p.answer.endswith(f"The answer is \\boxed{{{p.value}}}.")
        steps = [s.split(" = ") for s in re.findall(r"\d+ [-+*/] \d+ = \d+", p.answer)]
        assert steps, p.answer
        for lhs, rhs in steps:  # every step `a op b = c` is right
            x, op, y = lhs.split()
            assert {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y),
                    "/": int(x) // int(y)}[op] == int(rhs)
        assert 0 <= p.value <= 250


def test_training_stream_excludes_the_evaluation_questions():
    held_out = data.evaluation_set(300)
    exclude = {p.question for p in held_out}
    # the unfiltered stream of the same seed does hit evaluation questions (few templates, small numbers)
    raw = list(itertools.islice(data.generate(3), 20_000))
    assert any(p.question in exclude for p in raw)
    assert not any(p.question in exclude for p in itertools.islice(data.generate(3, exclude), 20_000))


# The objective ------------------------------------------------------------------------------------

def _examples() -> list[Example]:
    return [Example([1, 3, 50, 51, 4], [60, 61, 62, 63, 64, 65, EOS_ID]), Example([1, 3, 52, 4], [70, 71, EOS_ID])]


def test_joint_batch_layout_and_attention_mask():
    g = torch.Generator().manual_seed(0)
    b = 4
    batch = make_batch(_examples(), b, MASK_ID, EOS_ID, g, MaskSchedule(p_full=0.5, p_aligned=0.0))
    mask = batch.mask[:, 0]
    n, s = batch.tokens.shape
    assert mask.shape == (n, s, s)
    for i, e in enumerate(_examples()):
        kind, pos, start = batch.kind[i], batch.positions[i], batch.block_start[i]
        clean = (kind == CLEAN).nonzero()[:, 0]
        noisy = (kind == NOISY).nonzero()[:, 0]
        seq = e.prompt + e.answer
        assert batch.tokens[i, clean].tolist() == seq and pos[clean].tolist() == list(range(len(seq)))
        # noisy copy: whole blocks at the clean copy's absolute positions, covering the whole answer
        assert len(noisy) % b == 0 and pos[noisy].tolist() == list(range(int(pos[noisy[0]]), int(pos[noisy[-1]]) + 1))
        assert int(pos[noisy[0]]) <= len(e.prompt) and int(pos[noisy[-1]]) >= len(seq) - 1
        for q in range(s):
            for k in range(s):
                if kind[q] == CLEAN:
                    want = bool(kind[k] == CLEAN and pos[k] <= pos[q])
                elif kind[q] == NOISY:
                    own_block = kind[k] == NOISY and start[k] == start[q]
                    want = bool(own_block or (kind[k] == CLEAN and pos[k] < start[q]))
                else:
                    assert kind[q] == PAD
                    want = q == k
                assert bool(mask[i, q, k]) == want, (i, q, k)
        # llada targets: a masked noisy slot predicts its own token; clean slot j predicts token j + 1
        for slot in noisy.tolist():
            block_offset = int(pos[slot] - start[slot])
            t = int(batch.dlm_targets[i, slot])
            if batch.tokens[i, slot] == MASK_ID:
                truth = (seq + [EOS_ID] * b)[int(pos[slot])]
                assert t == truth and batch.dlm_weights[i, slot] >= 1.0 and block_offset > 0
                assert int(pos[slot]) >= len(e.prompt)
            else:
                assert t == IGNORE and batch.dlm_weights[i, slot] == 0
        ar = batch.ar_targets[i, clean].tolist()
        assert ar == [IGNORE] * (len(e.prompt) - 1) + e.answer + [IGNORE]


def test_full_masking_is_the_linear_spec_draft():
    """With p_full=1 every block is [first token, MASK x (B-1)] over the answer, as the draft pass feeds."""
    g = torch.Generator().manual_seed(1)
    batch = make_batch(_examples(), 4, MASK_ID, EOS_ID, g, MaskSchedule(p_full=1.0, p_aligned=1.0))
    for i, e in enumerate(_examples()):
        noisy = (batch.kind[i] == NOISY).nonzero()[:, 0]
        tokens = batch.tokens[i, noisy].view(-1, 4)
        assert int(batch.positions[i, noisy[0]]) == len(e.prompt)  # aligned with the answer's start
        assert tokens[:, 0].ne(MASK_ID).all() and tokens[:, 1:].eq(MASK_ID).all()


def test_losses_train_and_draft_adapter_touches_only_the_noisy_copy():
    torch.manual_seed(0)
    model = init_weights(NLDModel(tiny_config()), std=0.05)
    g = torch.Generator().manual_seed(2)
    batch = make_batch(_examples(), 4, MASK_ID, EOS_ID, g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = joint_loss(model, batch)
    for _ in range(20):
        opt.zero_grad()
        joint_loss(model, batch).total.backward()
        opt.step()
    last = joint_loss(model, batch)
    assert last.ar < first.ar and last.dlm < first.dlm

    q, h = model.config.num_attention_heads * model.config.head_dim, model.config.hidden_size
    layers = {i: (torch.randn(4, q, requires_grad=True), torch.randn(h, 4, requires_grad=True)) for i in range(2)}
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        plain = model.logits(model(batch.tokens, batch.positions, batch.mask))
        from nld_trt.training.objective import install_lora

        rows = install_lora(model, layers, 2.0, batch.kind == NOISY)
        adapted = model.logits(model(batch.tokens, batch.positions, batch.mask, lora_rows=rows))
        install_lora(model, layers, 2.0, None)
    clean = batch.kind == CLEAN
    assert torch.equal(plain[clean], adapted[clean])  # the verifier's view is untouched
    assert not torch.allclose(plain[batch.kind == NOISY], adapted[batch.kind == NOISY])
    loss = draft_loss(model, batch, layers, 2.0)
    loss.backward()
    assert torch.isfinite(loss) and all(a.grad is not None and b_.grad is not None for a, b_ in layers.values())
    assert not model.has_lora  # the adapter is removed after the pass


# The recipe end to end ----------------------------------------------------------------------------

def test_tiny_recipe_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "tiny-nld"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny_nld.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[joint] step" in proc.stdout and "[lora] step" in proc.stdout
    assert proc.stdout.count("2 workers in sync") == 2  # data parallel by default; weights agree after each phase
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "linear_spec_lora/adapter_config.json", "linear_spec_lora/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["config"] == json.loads((out / "config.json").read_text())
    assert summary["log"] and all(e["step"] > 0 for e in summary["log"])

    import nld_trt

    model = nld_trt.load(out, max_batch=2, max_seq_len=256)
    assert model.lora is not None and model.config.vocab_size % 128 == 0
    assert model.config.mask_token_id == MASK_ID and model.config.dlm_type == "llada"
    ar, spec = (model.generate(["Tom has 3 apples."], mode=m, max_new_tokens=12)[0] for m in ("ar", "linear_spec"))
    assert ar.token_ids == spec.token_ids  # greedy linear_spec is lossless even for an untrained model
