"""The training recipe: the data generator, the joint objective's batch layout and attention mask, and a
few steps of `scripts/train_tiny_nld.py --tiny` writing a checkpoint that loads and generates."""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
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


_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def _arithmetic_is_right(solution: str, value: int) -> bool:
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y, "/": lambda x, y: x // y}
    steps = _STEP.findall(solution)
    return bool(steps) and all(ops[op](int(x), int(y)) == int(z) for x, op, y, z in steps) and \
        solution.endswith(f"The answer is \\boxed{{{value}}}.") and int(steps[-1][3]) == value


def test_followups_are_worked_out_from_the_previous_problem():
    """Every template has follow-ups; each is solved in the trained style, its steps are right, and it
    uses the previous problem's numbers without restating the problem."""
    rng = random.Random(0)
    kinds = set()
    for p in itertools.islice(data.generate(11), 3000):
        f = data.followup(p, rng)
        assert f is not None, p.question
        kinds.add(f.kind)
        assert _arithmetic_is_right(f.answer, f.value), f.answer
        assert 0 <= f.value <= 400 and p.question not in f.question
        first = {int(x) for x in re.findall(r"\d+", f.answer.split(".")[0])}
        assert first & {int(x) for x in re.findall(r"\d+", p.question + p.answer)}, (p.question, f.answer)
        assert data.followup(f, rng) is None  # follow-ups are asked about a problem, not about a follow-up
    assert kinds == {f"followup:{make.__name__[3:]}" for makers in data.FOLLOWUPS.values() for make in makers}


def test_training_conversations_mix_turns_system_prompts_and_followups_and_hold_out_the_evaluation_set():
    held_out = data.evaluation_set()
    exclude = {p.question for p in held_out}
    convs = list(itertools.islice(data.conversations(3, exclude), 3000))
    assert convs == list(itertools.islice(data.conversations(3, exclude), 3000))  # seeded
    turns = collections.Counter(sum(m["role"] == "user" for m in c) for c in convs)
    assert set(turns) == {1, 2, 3, 4, 5} and 0.15 < turns[1] / len(convs) < 0.25
    assert 0.25 < sum(c[0]["role"] == "system" for c in convs) / len(convs) < 0.35
    followups = [m["content"] for c in convs for m in c if m["role"] == "user" and m["content"].startswith(("And", "Then", "How many more"))]
    assert len(followups) > 1000
    for c in convs:
        roles = [m["role"] for m in c if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and c[-1]["role"] == "assistant"
        assert not any(m["content"] in exclude for m in c)


def test_a_rendered_conversation_is_what_serving_sends_token_for_token():
    """The training text of every answer starts exactly where the prompt that serving builds for that turn
    ends: an OpenAI chat request's messages, through the front end's mapping and the Triton model's
    rendering (the checkpoint's chat template), give the ids before each loss span; the span is the answer's
    tokens and EOS, as the model must generate them."""
    from nld_trt.serving.openai.schema import ChatRequest, chat_request, parse
    from nld_trt.serving.openai.triton import ModelInfo
    from nld_trt.serving.protocol import Limits, prompt_ids
    import nld_trt

    served = nld_trt.load(max_batch=1, max_seq_len=1024)  # the embedded model, as the Triton model loads it
    tok = served.tokenizer
    info = ModelInfo("nld", {"messages": "BYTES", "text_input": "BYTES"}, {}, batched=True)
    limits = Limits(max_tokens_cap=512, default_max_tokens=128, streaming=True)
    convs = [c for c in itertools.islice(data.conversations(4), 60)]
    assert any(c[0]["role"] == "system" for c in convs) and any(len(c) >= 9 for c in convs)
    for c in convs:
        r = data.render(tok, c)
        assert r.ids == tok.encode(tok.apply_chat_template(c, add_generation_prompt=False), add_special_tokens=False)
        answers = [i for i, m in enumerate(c) if m["role"] == "assistant"]
        assert len(r.spans) == len(answers)
        for i, (s0, s1) in zip(answers, r.spans):
            request = parse(ChatRequest, json.dumps({"model": "nld", "messages": c[:i]}).encode())
            prompt = prompt_ids(served, chat_request(request, info).fields, limits)
            assert r.ids[:s0] == prompt.ids
            assert r.ids[s0:s1] == tok.encode(c[i]["content"], add_special_tokens=False) + [EOS_ID]
        assert data.render(tok, c, loss_on="last").spans == r.spans[-1:]


def test_conversation_evaluation_set_asks_each_question_at_every_turn_and_as_a_followup():
    size = 40
    problems = data.evaluation_set(size)
    rows = data.conversation_evaluation_set(size)
    groups = collections.defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    assert list(groups) == ["turn 1", "turn 2", "turn 3", "turn 4", "followup"]
    solved = {p.question: p.answer for p in problems}
    for k in range(1, 5):
        for i, r in enumerate(groups[f"turn {k}"]):
            m = [x for x in r["messages"] if x["role"] != "system"]
            assert r["index"] == i and m[-1] == {"role": "user", "content": problems[i].question}
            assert r["answer"] == problems[i].answer and len(m) == 2 * k - 1
            for q, a in zip(m[:-1:2], m[1:-1:2]):  # the earlier turns: other evaluation problems, solved
                assert q["role"] == "user" and q["content"] != problems[i].question
                assert a == {"role": "assistant", "content": solved[q["content"]]}
            if k < 4:  # the histories grow turn by turn: turn k's earlier turns open turn k + 1's
                history = r["messages"][:-1]
                assert groups[f"turn {k + 1}"][i]["messages"][: len(history)] == history
    for i, r in enumerate(groups["followup"]):
        m = [x for x in r["messages"] if x["role"] != "system"]
        assert m[:2] == [{"role": "user", "content": problems[i].question}, {"role": "assistant", "content": problems[i].answer}]
        value = int(re.search(r"boxed\{(\d+)\}", r["answer"]).group(1))
        assert _arithmetic_is_right(r["answer"], value)
    systems = [r["messages"][0]["role"] == "system" for r in groups["turn 1"]]
    assert 0 < sum(systems) < size and all(
        [r["messages"][0]["role"] == "system" for r in groups[g]] == systems for g in groups)
    assert rows == data.conversation_evaluation_set(size)


# The objective ------------------------------------------------------------------------------------

def _examples() -> list[Example]:
    return [Example.single([1, 3, 50, 51, 4], [60, 61, 62, 63, 64, 65, EOS_ID]),
            Example.single([1, 3, 52, 4], [70, 71, EOS_ID])]


def _conversation_examples() -> list[Example]:
    """Two answers each; in the first, a short user turn (a follow-up) puts the second answer's first block
    inside the range of the first answer's last block when the phase is random."""
    a = [1, 3, 50, 51, 4, 60, 61, 62, 63, 64, 65, EOS_ID, 3, 52, 4, 70, 71, EOS_ID]
    b = [1, 17, 90, 18, 3, 52, 4, 72, EOS_ID, 3, 53, 54, 4, 73, 74, 75, 76, EOS_ID]
    return [Example(a, [(5, 12), (15, 18)]), Example(b, [(7, 9), (13, 18)])]


def _check_mask(mask, kind, pos, start) -> None:
    """The attention rules of the objective's docstring, slot by slot."""
    s = len(kind)
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
            assert bool(mask[q, k]) == want, (q, k)


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
        seq = e.tokens
        ((p, _),) = e.spans
        assert batch.tokens[i, clean].tolist() == seq and pos[clean].tolist() == list(range(len(seq)))
        # noisy copy: whole blocks at the clean copy's absolute positions, covering the whole answer
        assert len(noisy) % b == 0 and pos[noisy].tolist() == list(range(int(pos[noisy[0]]), int(pos[noisy[-1]]) + 1))
        assert int(pos[noisy[0]]) <= p and int(pos[noisy[-1]]) >= len(seq) - 1
        _check_mask(mask[i], kind, pos, start)
        # llada targets: a masked noisy slot predicts its own token; clean slot j predicts token j + 1
        for slot in noisy.tolist():
            block_offset = int(pos[slot] - start[slot])
            t = int(batch.dlm_targets[i, slot])
            if batch.tokens[i, slot] == MASK_ID:
                truth = (seq + [EOS_ID] * b)[int(pos[slot])]
                assert t == truth and batch.dlm_weights[i, slot] >= 1.0 and block_offset > 0
                assert int(pos[slot]) >= p
            else:
                assert t == IGNORE and batch.dlm_weights[i, slot] == 0
        ar = batch.ar_targets[i, clean].tolist()
        assert ar == [IGNORE] * (p - 1) + seq[p:] + [IGNORE]


def test_every_answer_of_a_conversation_gets_its_own_blocks_and_targets():
    """Loss on every assistant turn: AR targets on the answers only; each answer covered by its own run of
    noisy blocks (told apart by their starts, also when a short user turn puts the next answer's first
    block inside the previous answer's last one), which see the clean conversation before them only."""
    b = 8
    overlapped = 0
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        batch = make_batch(_conversation_examples(), b, MASK_ID, EOS_ID, g, MaskSchedule(p_full=0.5, p_aligned=0.5))
        mask = batch.mask[:, 0]
        for i, e in enumerate(_conversation_examples()):
            kind, pos, start = batch.kind[i], batch.positions[i], batch.block_start[i]
            clean = (kind == CLEAN).nonzero()[:, 0]
            noisy = (kind == NOISY).nonzero()[:, 0].tolist()
            want_ar = [IGNORE] * len(e.tokens)
            for s0, s1 in e.spans:
                want_ar[s0 - 1 : s1 - 1] = e.tokens[s0:s1]
            assert batch.ar_targets[i, clean].tolist() == want_ar
            _check_mask(mask[i], kind, pos, start)
            # blocks in the order the row holds them; a span's blocks follow each other until it is covered
            starts = list(dict.fromkeys(int(start[j]) for j in noisy))
            runs: list[list[int]] = []
            for s in starts:
                if runs and s == runs[-1][-1] + b and s < e.spans[len(runs) - 1][1]:
                    runs[-1].append(s)
                else:
                    runs.append([s])
            assert len(runs) == len(e.spans) and starts == sorted(starts)
            overlapped += runs[1][0] < runs[0][-1] + b
            for (s0, s1), run in zip(e.spans, runs):
                assert s0 - b < run[0] <= s0 and run[-1] < s1 <= run[-1] + b
                for j in (j for j in noisy if int(start[j]) in run):
                    p = int(pos[j])
                    assert run[0] <= p < run[-1] + b
                    if batch.tokens[i, j] == MASK_ID:  # the answer's own token, then EOS (decoding stops there)
                        assert p >= s0 and int(batch.dlm_targets[i, j]) == (e.tokens[p] if p < s1 else EOS_ID)
                        assert int(batch.teacher[i, j]) == (p - 1 if p < s1 else -1)
                    else:
                        assert int(batch.dlm_targets[i, j]) == IGNORE and int(batch.teacher[i, j]) == -1
    assert overlapped  # the case the block starts must keep apart did occur


def test_full_masking_is_the_linear_spec_draft():
    """With p_full=1 every block is [first token, MASK x (B-1)] over the answer, as the draft pass feeds."""
    g = torch.Generator().manual_seed(1)
    batch = make_batch(_examples(), 4, MASK_ID, EOS_ID, g, MaskSchedule(p_full=1.0, p_aligned=1.0))
    for i, e in enumerate(_examples()):
        noisy = (batch.kind[i] == NOISY).nonzero()[:, 0]
        tokens = batch.tokens[i, noisy].view(-1, 4)
        assert int(batch.positions[i, noisy[0]]) == e.spans[0][0]  # aligned with the answer's start
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


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return kids


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process parents from /proc (Linux)")
def test_killing_the_trainer_stops_its_data_parallel_workers(tmp_path):
    """A trainer started in the background (`nohup ... &`: SIGINT ignored, as a shell starts a background command)
    and killed with SIGTERM: its two spawned workers stop within seconds instead of training on for nobody. torch's
    mp.spawn asks the kernel to send its workers SIGINT when their parent dies, which they then ignore too."""
    import os
    import signal
    import time

    workers: list[int] = []
    command = [sys.executable, str(ROOT / "scripts" / "train_tiny_nld.py"), "--out", str(tmp_path / "out"),
               "--steps", "100000", "--lora-steps", "1", "--time-budget", "30", "--hidden", "64", "--layers", "2",
               "--heads", "2", "--kv-heads", "1", "--head-dim", "32", "--intermediate", "128", "--vocab", "512",
               "--batch-tokens", "600", "--log-every", "2"]
    with (tmp_path / "log.txt").open("w") as log:  # the trainer writes through its own copy of the descriptor
        trainer = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # as `cmd &` runs it
    try:
        deadline = time.monotonic() + 120
        while (tmp_path / "log.txt").read_text().count("[joint] step") < 20:  # well into training
            assert trainer.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()
            time.sleep(0.5)
        workers = _children(trainer.pid)
        assert len(workers) >= 2
        trainer.send_signal(signal.SIGTERM)
        trainer.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(_running(w) for w in workers), "workers still training after their trainer was killed"
        assert "the trainer that started this worker is gone" in (tmp_path / "log.txt").read_text()
    finally:
        for pid in [trainer.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_tiny_vlm_recipe_writes_a_loadable_vision_language_checkpoint(tmp_path):
    """`--vlm --tiny`: the same recipe on picture conversations writes the release VLM layout (tower and
    projector under `encoder.`, the image tokens, a capped preprocessor), which loads and answers an image
    question with greedy linear_spec equal to ar."""
    from safetensors import safe_open

    from nld_trt.training import pictures

    out = tmp_path / "tiny-vlm"
    # two workers, most conversations text-only: some worker's batch has no picture (its tower gets no gradient)
    script = [sys.executable, str(ROOT / "scripts" / "train_tiny_nld.py"), "--vlm", "--tiny"]
    refused = subprocess.run(script + ["--p-single", "0.5", "--out", str(out)], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and "--p-single shape the text model's conversations" in refused.stderr
    assert not out.exists()
    proc = subprocess.run(script + ["--p-text", "0.7", "--out", str(out)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "in the tower and projector" in proc.stdout and "[lora] step" in proc.stdout and " cells " in proc.stdout
    assert proc.stdout.count("2 workers in sync") == 2
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron_labs_diffusion_vlm" and config["vision_config"]["model_type"] == "pixtral"
    assert config["vision_config"]["patch_size"] == 14 and config["spatial_merge_size"] == 2
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["config"] == config and summary["args"]["vlm"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        # the tower's and projector's RMSNorm weights (ln_pre too) stay at 1: set so and frozen
        norms = {n: f.get_tensor(n) for n in names if n.startswith("encoder.") and
                 n.split(".")[1] in ("vision_tower", "multi_modal_projector") and
                 n.rsplit(".", 2)[-2] in ("ln_pre", "attention_norm", "ffn_norm", "norm")}
    assert "encoder.vision_tower.ln_pre.weight" in norms and "encoder.multi_modal_projector.norm.weight" in norms
    assert all(bool((t == 1).all()) for t in norms.values()), {n: float(t.min()) for n, t in norms.items()}
    assert any(n.startswith("encoder.vision_tower.transformer.layers.0.") for n in names)
    assert any(n.startswith("encoder.multi_modal_projector.patch_merger.") for n in names)
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"longest_edge": 224}

    import nld_trt

    model = nld_trt.load(out, max_batch=2, max_seq_len=256)
    assert model.lora is not None and model.vlm is not None
    tok = model.tokenizer
    assert [tok.token_id(t) for t in ("<|image_start|>", "<|image_pad|>", "<|image_break|>", "<|image_end|>")] == \
           [18, 19, 20, 21]
    it = pictures.sample("digit")
    messages = [pictures.image_turn(it.scene, it.question.question)]
    ar, spec = (model.generate(messages, mode=m, max_new_tokens=10) for m in ("ar", "linear_spec"))
    assert ar.token_ids == spec.token_ids
    assert ar.images[0]["positions"] == 1 + 8 * 9  # a 224 x 224 picture: 8 x 8 cells

    # a second stage continues it: its first logged losses start where the first stage ended, not from scratch
    again = tmp_path / "tiny-vlm-2"
    looks = ["--look-weight", "1.0", "--look-layer", "1"]  # (the look loss itself: tests/test_pictures.py)
    bad_layer = subprocess.run(script + ["--look-weight", "1.0", "--look-layer", "2", "--out", str(again)],
                               capture_output=True, text=True, timeout=60)
    assert bad_layer.returncode == 2 and "--look-layer 2 is not a layer of a 2-layer backbone" in bad_layer.stderr
    text = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny_nld.py"), "--tiny", "--look-weight",
                           "1.0", "--out", str(again)], capture_output=True, text=True, timeout=60)
    assert text.returncode == 2 and "it needs --vlm" in text.stderr and not again.exists()
    proc2 = subprocess.run(script + ["--p-text", "0.7", "--weights-from", str(out), *looks, "--out", str(again)],
                           capture_output=True, text=True, timeout=180)
    assert proc2.returncode == 0, proc2.stdout + proc2.stderr
    assert " looks " in proc2.stdout and " looks " not in proc.stdout
    first = [float(re.search(r" ar ([0-9.]+)", line).group(1)) for line in proc.stdout.splitlines()
             if line.startswith("[joint] step")]
    second = [float(re.search(r" ar ([0-9.]+)", line).group(1)) for line in proc2.stdout.splitlines()
              if line.startswith("[joint] step")]
    assert second[0] < (first[0] + first[-1]) / 2, (first, second)  # from scratch it would repeat first[0]
    assert json.loads((again / "training_summary.json").read_text())["weights_from"]["model.safetensors"] == \
        hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    refused = subprocess.run(script + ["--weights-from", str(ROOT / "nld_trt" / "assets" / "tiny-nld"), "--out",
                                       str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "is a text checkpoint" in refused.stderr
