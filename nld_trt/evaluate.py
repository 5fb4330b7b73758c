"""`nld-trt eval`: accuracy and speed of one decoding mode on GSM8K / MATH-500 style problem sets.

A task is a built-in set or a JSONL file with a question field and an answer field (gsm8k answers end with
`#### N`; MATH-500's `answer` is the final answer itself), or with a `messages` field instead of the
question: a conversation (OpenAI-style {role, content} messages ending with the user turn to answer),
rendered by the checkpoint's chat template as serving renders it. Built-in sets: `gsm_synth`, the held-out
synthetic problems the embedded model was trained beside; `gsm_synth_chat`, the same questions asked as
turn 1 to 4 of conversations whose earlier turns are other solved evaluation problems, plus a follow-up
about a solved problem (`nld_trt.training.data.conversation_evaluation_set`); `shapes_synth`, the embedded
tiny VLM's held-out pictures (`nld_trt.training.pictures.evaluation_set`, drawn from their seed when asked:
shapes, colours, counts, positions, digits, bar charts, a follow-up about a picture, and text-only
arithmetic), whose default `--model` is the tiny VLM. Rows may name a `group` ("turn 2", "followup", "count");
the report then gives every group's figures too.

Scoring is exact match after normalization: the output's last `\\boxed{...}`, else its last number,
against the gold answer. Problems are generated in batches with the runtime's continuous batching, so the
speed figures are those of batched serving.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import click

from .cli_support import kv_kwargs, kv_options

from .errors import NLDError
from .fileutil import read_jsonl_rows

EVALSETS = Path(__file__).parent / "assets" / "evalsets"
BUILTIN_TASKS = {"gsm_synth": EVALSETS / "gsm_synth.jsonl"}
CONVERSATION_TASKS = ("gsm_synth_chat",)  # built from the training module's evaluation set, not a file
IMAGE_TASKS = ("shapes_synth",)  # pictures drawn from the picture module's evaluation seed; the VLM's tasks
PROGRESS_EVERY = 50

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


# Answers ------------------------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unclosed: the generation was cut off


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def normalize(answer: str) -> str:
    """Canonical form: no commas, `$`, spaces or trailing period; numbers as plain decimals (`5.0` -> `5`)."""
    s = answer.strip().replace(",", "").replace("\\$", "").replace("$", "").replace("\\!", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return s
    if not d.is_finite():
        return s
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_answer(output: str) -> str | None:
    """The model's answer: the last `\\boxed{}`, else the last number; normalized."""
    found = last_boxed(output)
    if found is None:
        found = last_number(output)
    return None if found is None else normalize(found)


def gold_answer(answer: str) -> str:
    """The gold answer of an answer field: after `####` (gsm8k), else the last `\\boxed{}` (a MATH
    solution), else the field itself when it is short (MATH-500 `answer`), else its last number."""
    if "####" in answer:
        return normalize(answer.rsplit("####", 1)[1])
    boxed = last_boxed(answer)
    if boxed is not None:
        return normalize(boxed)
    text = answer.strip()
    if len(text) <= 32 or last_number(text) is None:
        return normalize(text)
    return normalize(last_number(text))


def is_correct(output: str, gold: str) -> bool:
    """Whether `output` answers `gold` (an already normalized gold answer)."""
    return extract_answer(output) == gold


# Tasks --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    question: str  # the question asked (with `messages`: the last user turn)
    gold: str  # normalized
    messages: tuple[dict, ...] | None = None  # a conversation ending with the user turn to answer
    group: str | None = None  # reported apart too ("turn 2", "followup", ...)
    index: int | None = None  # the question's number: --limit N keeps every row of questions 0..N-1


def read_jsonl(path: str | Path, question_field: str = "question", answer_field: str = "answer") -> list[Problem]:
    """Problems of a JSONL file; every malformed line is an NLDError naming the file and line."""
    problems = []
    for where, row in read_jsonl_rows(path, "task", NLDError):
        if not isinstance(row, dict):
            raise NLDError(f"{where}: expected a JSON object, found {type(row).__name__}")
        messages = None
        if "messages" in row:  # a conversation: the question is its last turn
            messages = _conversation(where, row["messages"])
            row = {question_field: messages[-1]["content"], **row}
        for f in (question_field, answer_field):
            if f not in row:
                raise NLDError(
                    f"{where}: no field {f!r} (fields: {', '.join(map(str, row)) or 'none'}); "
                    "choose them with --question-field / --answer-field"
                )
        q, a = row[question_field], row[answer_field]
        if not isinstance(q, str) or not q.strip():
            raise NLDError(f"{where}: field {question_field!r} must be a non-empty string")
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a)
        if not isinstance(a, str) or not a.strip():
            raise NLDError(f"{where}: field {answer_field!r} must be a non-empty string or a number")
        group = row.get("group")
        if group is not None and not isinstance(group, str):
            raise NLDError(f"{where}: field 'group' must be a string")
        problems.append(Problem(q, gold_answer(a), messages, group))
    if not problems:
        raise NLDError(f"task file {path} holds no problems")
    return problems


def _conversation(where: str, messages) -> tuple[dict, ...]:
    """A task row's `messages`: {role, content} text messages ending with a user turn."""
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        raise NLDError(f"{where}: field 'messages' must be a non-empty list of {{\"role\": system|user|assistant, "
                       "\"content\": text}")
    if messages[-1]["role"] != "user":
        raise NLDError(f"{where}: 'messages' must end with the user turn to answer, not {messages[-1]['role']!r}")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def conversation_task() -> list[Problem]:
    """`gsm_synth_chat`: the evaluation questions as turns 1-4 of conversations, and a follow-up variant."""
    from .training import data

    return [Problem(r["messages"][-1]["content"], gold_answer(r["answer"]), tuple(r["messages"]), r["group"],
                    r["index"]) for r in data.conversation_evaluation_set()]


def image_task() -> list[Problem]:
    """`shapes_synth`: questions about held-out synthetic pictures, per kind, plus follow-ups and arithmetic."""
    from .training import pictures

    return [Problem(_last_text(r["messages"]), gold_answer(r["answer"]), tuple(r["messages"]), r["group"], r["index"])
            for r in pictures.evaluation_set()]


def _last_text(messages: list[dict]) -> str:
    content = messages[-1]["content"]
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p.get("type") == "text")


def _printable(messages: tuple[dict, ...]) -> list[dict]:
    """Messages for a JSON record: image parts as {"type": "image"} (the picture itself is not written)."""
    return [m if isinstance(m["content"], str) else
            {**m, "content": [p if p.get("type") == "text" else {"type": "image"} for p in m["content"]]}
            for m in messages]


def limit_task(problems: list[Problem], limit: int | None) -> list[Problem]:
    """The first `limit` questions: rows numbered by question (a conversation set) keep every row of the
    questions below `limit`, so each group covers the same questions; other sets keep their first rows."""
    if limit is None:
        return problems
    if all(p.index is not None for p in problems):
        return [p for p in problems if p.index < limit]
    return problems[:limit]


def load_task(name: str, question_field: str = "question", answer_field: str = "answer") -> list[Problem]:
    """A built-in task by name, or a JSONL file by path."""
    if name in CONVERSATION_TASKS:
        return conversation_task()
    if name in IMAGE_TASKS:
        return image_task()
    if name in BUILTIN_TASKS:
        return read_jsonl(BUILTIN_TASKS[name])
    if Path(name).suffix in (".jsonl", ".json") or Path(name).exists():
        return read_jsonl(name, question_field, answer_field)
    raise NLDError(f"unknown task {name!r}: use one of {', '.join([*BUILTIN_TASKS, *CONVERSATION_TASKS, *IMAGE_TASKS])} "
                   "or the path of a JSONL file")


def default_model_for(name: str) -> Path:
    """The embedded model a task is asked of without --model: the tiny VLM for picture tasks, else the text model."""
    from .runtime import default_model_path

    return default_model_path(images=name in IMAGE_TASKS)


# Running ------------------------------------------------------------------------------------------

@dataclass
class EvalReport:
    task: str
    mode: str
    lora: bool
    problems: int = 0
    correct: int = 0
    tokens: int = 0
    nfe: int = 0
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list, repr=False)
    groups: dict[str, EvalReport] = field(default_factory=dict, repr=False)

    def add(self, correct: bool, tokens: int, nfe: int) -> None:
        self.problems += 1
        self.correct += correct
        self.tokens += tokens
        self.nfe += nfe

    @property
    def accuracy(self) -> float:
        return self.correct / self.problems if self.problems else 0.0

    @property
    def tpf(self) -> float:
        return self.tokens / self.nfe if self.nfe else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        n = max(self.problems, 1)
        out = {
            "task": self.task, "mode": self.mode, "lora": self.lora, "problems": self.problems,
            "accuracy": round(self.accuracy, 4), "avg_tokens": round(self.tokens / n, 2),
            "avg_nfe": round(self.nfe / n, 2), "tpf": round(self.tpf, 3),
            "tokens_per_s": round(self.tokens_per_s, 1), "seconds": round(self.seconds, 2),
        }
        if self.groups:  # per group: the same figures but speed (groups share batches)
            out["groups"] = {name: {k: v for k, v in g.as_dict().items() if k in ("problems", "accuracy", "avg_tokens",
                                                                                  "avg_nfe", "tpf")}
                             for name, g in self.groups.items()}
        return out

    def line(self) -> str:
        d = self.as_dict()
        text = (f"{self.task} {self.mode}{' +lora' if self.lora and self.mode == 'linear_spec' else ''}: "
                f"accuracy {d['accuracy']:.2%}  avg tokens {d['avg_tokens']}  avg NFE {d['avg_nfe']}  "
                f"TPF {d['tpf']:.2f}  problems {self.problems}  {d['tokens_per_s']} tokens/s")
        for name, g in self.groups.items():
            text += (f"\n  {name:>10}: accuracy {g.accuracy:.2%}  avg tokens {g.tokens / max(g.problems, 1):.2f}  "
                     f"TPF {g.tpf:.2f}  problems {g.problems}")
        return text


def evaluate(
    model,
    problems: list[Problem],
    *,
    task: str = "task",
    mode: str = "ar",
    lora: bool = True,
    block_length: int | None = None,
    threshold: float | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Generate (greedy, chat template) for every problem in batches and score the outputs. A conversation
    (with images or not) goes to `generate` as its messages: the prompt encoder (nld_trt/prompt.py) renders it
    as it renders a served `messages` request."""
    used_lora = lora and model.lora is not None
    report = EvalReport(task, mode, used_lora)
    chunk = max(batch_size, PROGRESS_EVERY)
    for begin in range(0, len(problems), chunk):
        part = problems[begin : begin + chunk]
        prompts = [p.question if p.messages is None else [dict(m) for m in p.messages] for p in part]
        start = time.perf_counter()
        results = model.generate(prompts, mode=mode, lora=lora, block_length=block_length,
                                 threshold=threshold, max_new_tokens=max_new_tokens)
        report.seconds += time.perf_counter() - start
        for p, r in zip(part, results):
            ok = is_correct(r.text, p.gold)
            report.add(ok, r.stats.tokens, r.stats.nfe)
            if p.group is not None:
                report.groups.setdefault(p.group, EvalReport(task, mode, used_lora)).add(ok, r.stats.tokens, r.stats.nfe)
            record = {"question": p.question, "gold": p.gold, "output": r.text, "predicted": extract_answer(r.text),
                      "correct": ok, "token_ids": r.token_ids, "tokens": r.stats.tokens, "nfe": r.stats.nfe}
            if p.messages is not None:
                record.update(messages=_printable(p.messages), group=p.group, index=p.index)
            report.records.append(record)
        if progress is not None and (report.problems // PROGRESS_EVERY > begin // PROGRESS_EVERY
                                     or report.problems == len(problems)):
            progress(f"[{task} {mode}] {report.problems}/{len(problems)}  accuracy {report.accuracy:.2%}  "
                     f"TPF {report.tpf:.2f}  {report.tokens_per_s:.0f} tokens/s")
    return report


# The command --------------------------------------------------------------------------------------

@click.command("eval")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="checkpoint directory (default: the embedded tiny NLD model; for shapes_synth the embedded tiny VLM)")
@click.option("--tasks", default="gsm_synth", show_default=True,
              help="comma-separated: built-in sets (gsm_synth: the embedded model's held-out set; gsm_synth_chat: "
                   "its questions as turns 1-4 of conversations and as follow-ups; shapes_synth: the tiny VLM's "
                   "held-out pictures) or JSONL paths")
@click.option("--mode", default="ar", show_default=True, type=click.Choice(["ar", "dlm", "linear_spec"]))
@click.option("--lora/--no-lora", default=True, show_default=True, help="draft with the linear_spec LoRA adapter")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="only the first N problems of each task (of a conversation set: every row of its first N questions)")
@click.option("--block-length", type=int, default=None, help="block length (default: the checkpoint's block_size)")
@click.option("--threshold", type=float, default=None, help="confidence threshold (default 0.9 dlm, 0.0 linear_spec)")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="sequences decoded together")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--question-field", default="question", show_default=True, help="JSONL field holding the question")
@click.option("--answer-field", default="answer", show_default=True, help="JSONL field holding the gold answer")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per task instead of the summary line")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="write per-problem records (JSONL)")
@kv_options
def eval_command(model_dir, tasks, mode, lora, limit, block_length, threshold, batch_size, max_new_tokens,
                 question_field, answer_field, device, dtype, as_json, output, kv_cache_tokens, kv_cache_gb, page_size,
                 prefix_cache) -> None:
    """Accuracy, tokens per forward and speed of one decoding mode on problem sets (greedy)."""
    from .checkpoint import check_model_dir
    from .runtime import load

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise NLDError("--tasks names no task")
    paths = {name: default_model_for(name) if model_dir is None else Path(model_dir) for name in names}
    for path in set(paths.values()):
        check_model_dir(path, lora=lora)
    sets = {name: limit_task(load_task(name, question_field, answer_field), limit) for name in names}
    models: dict[Path, object] = {}
    records = []
    for name, problems in sets.items():
        if paths[name] not in models:  # each model once, in the order its tasks come
            models[paths[name]] = load(paths[name], device=device, dtype=dtype, max_batch=batch_size, lora=lora,
                                       **kv_kwargs(kv_cache_tokens, kv_cache_gb, page_size, prefix_cache))
        model = models[paths[name]]
        report = evaluate(model, problems, task=name, mode=mode, lora=lora, block_length=block_length,
                          threshold=threshold, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          progress=lambda line: click.echo(line, err=True))
        click.echo(json.dumps(report.as_dict()) if as_json else report.line())
        records += [{"task": name, **r} for r in report.records]
    if output:
        Path(output).write_text("".join(json.dumps(r) + "\n" for r in records))
