"""Local lm-eval tasks over the embedded evaluation questions, written into a directory for `--include_path`.

- `nld_mc`: multiple choice (loglikelihood): each question with 4 candidate answers, the gold one and three
  distractors near it, scored as the continuation `N}` after `<question>\\nThe answer is \\boxed{`.
- `nld_gen_ar`, `nld_gen_linear_spec`: generate_until through the chat template, greedy, the decoding mode as a
  generation kwarg, scored by nld-trt eval's own rule (nld_trt.evaluate.is_correct) in `process_results`.
"""

from __future__ import annotations

import json
from pathlib import Path

from nld_trt.evaluate import load_task

MC_CONTEXT = "{question}\nThe answer is \\boxed{{"


def mc_docs(n: int) -> list[dict]:
    """n questions with 4 distinct candidate answers each; the gold one's position varies."""
    docs = []
    for i, p in enumerate(load_task("gsm_synth")[:n]):
        gold = int(p.gold)
        others = [c for c in (gold + 1, gold + 10, gold - 1 if gold > 0 else gold + 2, gold + 5) if c != gold][:3]
        choices = others[:]
        target = i % 4
        choices.insert(target, gold)
        docs.append({"question": p.question, "choices": [f"{c}}}" for c in choices], "target": target})
    return docs


GEN_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []
  max_gen_toks: {max_tokens}
  temperature: 0
  mode: {mode}
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

MC_TASK = """task: nld_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nThe answer is \\\\boxed{{"
target_delimiter: ""
doc_to_choice: choices
doc_to_target: target
metric_list:
  - metric: acc
"""

UTILS = '''from nld_trt.evaluate import gold_answer, is_correct


def process_results(doc, results):
    return {"acc": float(is_correct(results[0], gold_answer(doc["answer"])))}
'''


def write_tasks(directory: Path, mc: int, gen: int, max_tokens: int) -> dict[str, list[dict]]:
    """The task files in `directory`; returns the documents of each task."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = {"nld_mc": mc_docs(mc),
            "gen": [{"question": p.question, "answer": f"#### {p.gold}"} for p in load_task("gsm_synth")[:gen]]}
    for name, rows in (("mc", docs["nld_mc"]), ("gen", docs["gen"])):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "nld_mc.yaml").write_text(MC_TASK.format(data=directory / "mc.jsonl"))
    for mode in ("ar", "linear_spec"):
        (directory / f"nld_gen_{mode}.yaml").write_text(
            GEN_TASK.format(name=f"nld_gen_{mode}", data=directory / "gen.jsonl", max_tokens=max_tokens, mode=mode))
    (directory / "utils.py").write_text(UTILS)
    return docs
