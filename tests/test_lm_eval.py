"""EleutherAI's lm-eval, run as users run it (its CLI, its `local-completions` and `local-chat-completions`
models, unchanged), against `nld-trt serve` of the embedded model (a real tritonserver and the OpenAI front end;
the model directory packaged into the serve cache on the way).

- A multiple-choice task (loglikelihood: echo + logprobs over token ids, lm-eval's remote tokenizer through
  /tokenize) picks, question by question, the answer a direct computation with the Python API picks
  (prompt_logprobs over the same tokens), so the accuracies are equal.
- A generate_until task through the chat endpoint, in `ar` and in `linear_spec` (the mode a generation kwarg),
  gives `nld-trt eval`'s outputs and accuracy (nld_trt.evaluate.evaluate, the same questions and max tokens).
The numbers of the current embedded model are not pinned: both sides are computed in the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lm_eval_tasks import MC_CONTEXT, write_tasks
from openai_stack import require_stack, start_stack

require_stack()
pytest.importorskip("lm_eval", reason="lm-eval is in the test extra (pip install -e '.[test]')")

import nld_trt  # noqa: E402
from nld_trt.evaluate import evaluate, load_task  # noqa: E402

MC_QUESTIONS, GEN_QUESTIONS, MAX_TOKENS = 20, 20, 128


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lm-eval")
    s = start_stack(None, directory, extra=("--max-batch", "8", "--max-seq-len", "1024", "--max-tokens-cap", "400",
                                            "--cache-dir", str(directory / "cache")))
    yield s
    code = s.stop()
    assert code == 0, s.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lm-eval-tasks")
    return directory, write_tasks(directory / "tasks", MC_QUESTIONS, GEN_QUESTIONS, MAX_TOKENS)


@pytest.fixture(scope="module")
def nld():
    return nld_trt.load(max_batch=8, max_seq_len=1024)


def lm_eval(model: str, base_url: str, task_names: str, directory: Path, *extra: str) -> tuple[dict, dict]:
    """Run the lm_eval CLI; (its results, task -> its logged samples)."""
    out = directory / f"out-{model}"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args",
           f"model=nld,base_url={base_url},num_concurrent=1,max_retries=1", "--tasks", task_names, "--include_path",
           str(directory / "tasks"), "--output_path", str(out), "--log_samples", *extra]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=directory)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"]
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        samples[path.name.removeprefix("samples_").rsplit("_", 1)[0]] = sorted(rows, key=lambda r: r["doc_id"])
    return results, samples


def test_serve_of_a_model_directory_packaged_it_into_the_cache(stack):
    log = stack.log.read_text()
    assert "nld-trt: packaged " in log
    cache = Path(log.split("nld-trt: packaged ", 1)[1].split(" for ", 1)[0])
    assert (cache / "nld" / "config.pbtxt").is_file() and (cache / "nld_tokenizer" / "config.pbtxt").is_file()


def test_multiple_choice_loglikelihood_picks_the_python_api_answers(stack, tasks, nld):
    directory, docs = tasks
    results, samples = lm_eval("local-completions", f"{stack.base_url}/v1/completions", "nld_mc", directory)
    tok = nld.tokenizer
    # lm-eval's pairing (TemplateLM._encode_pair): encode the context, and context + continuation, and split
    requests = []
    for doc in docs["nld_mc"]:
        context = MC_CONTEXT.format(question=doc["question"])
        ctx = tok.encode(context, add_special_tokens=False)
        for choice in doc["choices"]:
            whole = tok.encode(context + choice, add_special_tokens=False)
            requests.append((ctx, whole[len(ctx):]))
    scored = nld.generate([c + k for c, k in requests], chat=False, max_new_tokens=0, prompt_logprobs=0)
    direct = [sum(lp.logprob for lp in r.prompt_logprobs[len(c):]) for (c, _), r in zip(requests, scored)]
    want = [int(np.argmax(direct[4 * i : 4 * i + 4])) for i in range(MC_QUESTIONS)]
    got = [int(np.argmax([float(r[0][0]) for r in s["resps"]])) for s in samples["nld_mc"]]
    assert got == want
    for s, i in zip(samples["nld_mc"], range(MC_QUESTIONS)):  # the loglikelihoods themselves, not only the argmax
        assert [float(r[0][0]) for r in s["resps"]] == pytest.approx(direct[4 * i : 4 * i + 4], abs=1e-3)
    accuracy = float(np.mean([w == d["target"] for w, d in zip(want, docs["nld_mc"])]))
    assert results["nld_mc"]["acc,none"] == pytest.approx(accuracy)


def test_generate_until_through_the_chat_endpoint_equals_nld_trt_eval(stack, tasks, nld):
    directory, _ = tasks
    results, samples = lm_eval("local-chat-completions", f"{stack.base_url}/v1/chat/completions",
                               "nld_gen_ar,nld_gen_linear_spec", directory, "--apply_chat_template")
    problems = load_task("gsm_synth")[:GEN_QUESTIONS]
    for mode in ("ar", "linear_spec"):
        report = evaluate(nld, problems, mode=mode, max_new_tokens=MAX_TOKENS, batch_size=8)
        texts = [s["resps"][0][0] for s in samples[f"nld_gen_{mode}"]]
        assert texts == [r["output"] for r in report.records]
        assert results[f"nld_gen_{mode}"]["acc,none"] == pytest.approx(report.accuracy)
