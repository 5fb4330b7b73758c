"""`nld-trt eval`: the scorer, task loading and its errors, and the command end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from nld_trt.errors import NLDError
from nld_trt.evaluate import (
    BUILTIN_TASKS,
    eval_command,
    extract_answer,
    gold_answer,
    is_correct,
    last_boxed,
    limit_task,
    load_task,
    normalize,
    read_jsonl,
)
from nld_trt.training import data


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1,234", "1234"), ("$5", "5"), ("\\$5", "5"), ("5.", "5"), ("5.0", "5"), ("5.50", "5.5"), (" 42 ", "42"),
     ("-3", "-3"), ("0.25", "0.25"), ("\\frac{1}{2}", "\\frac{1}{2}"), ("x + 1", "x+1")],
)
def test_normalize(raw, expected):
    assert normalize(raw) == expected


@pytest.mark.parametrize(
    ("output", "answer"),
    [
        ("3 * 4 = 12. The answer is \\boxed{12}.", "12"),
        ("\\boxed{3} first, then \\boxed{1,000}", "1000"),  # the last box wins
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("She pays 7 + 8 = 15 dollars.", "15"),  # no box: the trailing number
        ("It costs $1,250.00 in total", "1250"),
        ("\\boxed{7", "7"),  # an unclosed box (cut-off generation) falls back to the last number
        ("no number at all", None),
    ],
)
def test_extract_answer(output, answer):
    assert extract_answer(output) == answer


def test_gold_answer_formats():
    assert gold_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"  # gsm8k
    assert gold_answer("#### 1,000") == "1000"
    assert gold_answer("so it is \\boxed{\\frac{14}{3}}.") == "\\frac{14}{3}"  # a MATH solution
    assert gold_answer("\\frac{14}{3}") == "\\frac{14}{3}"  # MATH-500 `answer`
    assert gold_answer("18") == "18"
    assert last_boxed("no box") is None


def test_is_correct_compares_normalized_numbers():
    assert is_correct("The answer is \\boxed{12.0}.", "12")
    assert not is_correct("The answer is \\boxed{13}.", "12")
    assert not is_correct("", "12")


def test_builtin_set_scores_its_own_solutions():
    """Every solution of the shipped set is scored correct against itself, and the set is large and
    distinct (the training stream excludes exactly these questions)."""
    rows = [json.loads(line) for line in BUILTIN_TASKS["gsm_synth"].read_text().splitlines()]
    problems = load_task("gsm_synth")
    assert len(problems) == len(rows) >= 300
    assert len({p.question for p in problems}) == len(problems)
    assert all(is_correct(r["answer"], p.gold) for r, p in zip(rows, problems))
    assert [p.question for p in problems] == [p.question for p in data.evaluation_set(len(problems))]


def test_jsonl_fields_and_gsm8k_answers(tmp_path):
    f = tmp_path / "math.jsonl"
    f.write_text(json.dumps({"problem": "1+1?", "answer": 2}) + "\n\n"
                 + json.dumps({"problem": "half?", "answer": "\\frac{1}{2}"}) + "\n")
    problems = read_jsonl(f, "problem", "answer")
    assert [(p.question, p.gold) for p in problems] == [("1+1?", "2"), ("half?", "\\frac{1}{2}")]
    g = tmp_path / "gsm8k.jsonl"
    g.write_text(json.dumps({"question": "q", "answer": "2 + 2 = 4\n#### 4"}) + "\n")
    assert load_task(str(g))[0].gold == "4"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no problems"),
        ("\n  \n", "holds no problems"),
        ('{"question": "q", "answer": "1"}\n{not json\n', ":2: not valid JSON"),
        ('["q", "1"]\n', "expected a JSON object"),
        ('{"question": "q"}\n', "no field 'answer'"),
        ('{"question": "", "answer": "1"}\n', "non-empty string"),
        ('{"question": "q", "answer": null}\n', "non-empty string or a number"),
    ],
)
def test_bad_task_files(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(NLDError, match=message):
        read_jsonl(f)


def test_unknown_and_missing_tasks(tmp_path):
    with pytest.raises(NLDError, match="unknown task 'gsm_nope'"):
        load_task("gsm_nope")
    with pytest.raises(NLDError, match="not found"):
        load_task(str(tmp_path / "missing.jsonl"))


def test_eval_command_end_to_end(tiny_dir, tmp_path):
    """The command on a random tiny model: summary JSON per task, records file, the limit respected."""
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"q": f"What is {i} + 1?", "a": f"#### {i + 1}"}) + "\n" for i in range(5)))
    out = tmp_path / "records.jsonl"
    result = CliRunner().invoke(eval_command, [
        "--model", str(tiny_dir), "--tasks", f"{f},gsm_synth", "--mode", "linear_spec", "--limit", "3",
        "--question-field", "q", "--answer-field", "a", "--batch-size", "2", "--max-new-tokens", "8", "--json",
        "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [s["task"] for s in summaries] == [str(f), "gsm_synth"]
    for s in summaries:
        assert s["problems"] == 3 and s["mode"] == "linear_spec" and 0 <= s["accuracy"] <= 1
        assert 0 < s["avg_tokens"] <= 8 and s["tpf"] > 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and all(len(r["token_ids"]) == r["tokens"] for r in records)


def test_eval_command_bad_task_is_a_clear_error(tiny_dir):
    result = CliRunner().invoke(eval_command, ["--model", str(tiny_dir), "--tasks", "nope"])
    assert result.exit_code != 0
    assert isinstance(result.exception, NLDError) and "unknown task" in str(result.exception)


def test_eval_defaults_to_the_embedded_model_and_its_evaluation_set():
    result = CliRunner().invoke(eval_command, ["--mode", "ar", "--limit", "2", "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(s["task"], s["problems"], s["mode"]) for s in summaries] == [("gsm_synth", 2, "ar")]


# Conversations --------------------------------------------------------------------------------------

def test_conversation_set_and_its_limit_keep_every_group_on_the_same_questions():
    problems = load_task("gsm_synth_chat")
    groups = ["turn 1", "turn 2", "turn 3", "turn 4", "followup"]
    assert [p.group for p in problems] == [g for g in groups for _ in range(data.EVAL_SIZE)]
    limited = limit_task(problems, 3)
    assert [(p.group, p.index) for p in limited] == [(g, i) for g in groups for i in range(3)]
    plain = load_task("gsm_synth")
    for p in limited:
        assert p.messages[-1] == {"role": "user", "content": p.question}
        if p.group != "followup":  # turn k asks evaluation question `index`
            assert (p.question, p.gold) == (plain[p.index].question, plain[p.index].gold)
    assert limit_task(plain, 3) == plain[:3]


def test_jsonl_conversations(tmp_path):
    f = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "and 2+2?"}]
    f.write_text(json.dumps({"messages": messages, "answer": "4", "group": "turn 2"}) + "\n")
    (p,) = read_jsonl(f)
    assert (p.question, p.gold, p.messages, p.group) == ("and 2+2?", "4", tuple(messages), "turn 2")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": [], "answer": "1"}, "non-empty list"),
        ({"messages": [{"role": "user", "content": 3}], "answer": "1"}, "non-empty list"),
        ({"messages": [{"role": "tool", "content": "x"}], "answer": "1"}, "system|user|assistant"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "1"},
         "must end with the user turn"),
        ({"messages": [{"role": "user", "content": "q"}], "answer": "1", "group": 2}, "'group' must be a string"),
    ],
)
def test_bad_conversation_rows(tmp_path, row, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(NLDError, match=message):
        read_jsonl(f)


def test_eval_command_reports_every_group_of_a_conversation_set(tiny_dir, tmp_path):
    out = tmp_path / "records.jsonl"
    result = CliRunner().invoke(eval_command, [
        "--model", str(tiny_dir), "--tasks", "gsm_synth_chat", "--mode", "linear_spec", "--limit", "2",
        "--max-new-tokens", "4", "--json", "--output", str(out)])
    assert result.exit_code == 0, result.output
    (summary,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert summary["problems"] == 10
    assert {g: s["problems"] for g, s in summary["groups"].items()} == {
        "turn 1": 2, "turn 2": 2, "turn 3": 2, "turn 4": 2, "followup": 2}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["group"] for r in records][::2] == ["turn 1", "turn 2", "turn 3", "turn 4", "followup"]
    assert all(r["messages"][-1]["content"] == r["question"] for r in records)
    text = CliRunner().invoke(eval_command, ["--model", str(tiny_dir), "--tasks", "gsm_synth_chat", "--limit", "1",
                                             "--max-new-tokens", "2"]).stdout
    assert "turn 3: accuracy" in text and "followup: accuracy" in text
