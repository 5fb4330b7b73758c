"""Seeded GSM8K-style arithmetic word problems with worked solutions.

Every problem is a question (the prompt) and a solution (the target) whose steps are written `a op b = c`
and which ends with `The answer is \\boxed{N}.`, the format the evaluation scorer reads. The templates are
few on purpose: a tiny model learns them in minutes on a CPU, and the templated wording is what lets the
diffusion drafts of `dlm` and `linear_spec` decide many tokens per pass. Numbers stay small (answers up to
about 200) so the arithmetic is learnable digit by digit.

The evaluation set comes from its own seed; the training stream skips any question it contains.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

EVAL_SEED = 20260523
EVAL_SIZE = 500

NAMES = [
    ("Tom", "he"), ("Ann", "she"), ("Sara", "she"), ("Ben", "he"), ("Lily", "she"), ("Max", "he"),
    ("Emma", "she"), ("Noah", "he"), ("Mia", "she"), ("Leo", "he"), ("Zoe", "she"), ("Sam", "he"),
    ("Nina", "she"), ("Omar", "he"), ("Rosa", "she"), ("Jack", "he"), ("Ivy", "she"), ("Luke", "he"),
    ("Kate", "she"), ("Paul", "he"),
]
ITEMS = [
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "stamps", "shells", "candies",
    "balloons", "crayons", "buttons", "flowers", "eggs", "toys", "coins", "beads", "muffins", "oranges",
]
PACKS = [("box", "boxes"), ("bag", "bags"), ("pack", "packs"), ("jar", "jars"), ("basket", "baskets"),
         ("crate", "crates")]
ACTIVITIES = [("reads", "pages"), ("runs", "miles"), ("writes", "lines"), ("saves", "dollars"),
              ("bakes", "cookies"), ("folds", "cranes")]


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the worked solution, ending with "The answer is \boxed{N}."
    value: int  # N


def _boxed(n: int) -> str:
    return f"The answer is \\boxed{{{n}}}."


def _people(rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]]:
    a, b = rng.sample(NAMES, 2)
    return a, b


def packs_given_away(rng: random.Random) -> Problem:
    (name, pron), (friend, _) = _people(rng)
    item, (pack, packs) = rng.choice(ITEMS), rng.choice(PACKS)
    p, n = rng.randint(2, 9), rng.randint(3, 12)
    total = p * n
    g = rng.randint(1, total - 1)
    left = total - g
    q = (f"{name} buys {p} {packs} of {item}. Each {pack} has {n} {item}. {pron.capitalize()} gives {g} {item} "
         f"to {friend}. How many {item} does {name} have left?")
    a = (f"{name} buys {p} * {n} = {total} {item}. After giving {g} to {friend}, {pron} has "
         f"{total} - {g} = {left} {item} left. {_boxed(left)}")
    return Problem(q, a, left)


def two_prices(rng: random.Random) -> Problem:
    (name, pron), _ = _people(rng)
    i1, i2 = rng.sample(ITEMS, 2)
    a1, p1 = rng.randint(2, 9), rng.randint(2, 12)
    a2, p2 = rng.randint(2, 9), rng.randint(2, 9)
    x, y = a1 * p1, a2 * p2
    z = x + y
    q = (f"{name} buys {a1} {i1} for ${p1} each and {a2} {i2} for ${p2} each. "
         f"How many dollars does {pron} spend in total?")
    a = (f"The {i1} cost {a1} * {p1} = {x} dollars. The {i2} cost {a2} * {p2} = {y} dollars. "
         f"In total {pron} spends {x} + {y} = {z} dollars. {_boxed(z)}")
    return Problem(q, a, z)


def more_than(rng: random.Random) -> Problem:
    (name, _), (friend, _) = _people(rng)
    item = rng.choice(ITEMS)
    a, b = rng.randint(5, 60), rng.randint(2, 40)
    c = a + b
    d = a + c
    q = (f"{name} has {a} {item}. {friend} has {b} more {item} than {name}. "
         f"How many {item} do they have together?")
    ans = (f"{friend} has {a} + {b} = {c} {item}. Together they have {a} + {c} = {d} {item}. {_boxed(d)}")
    return Problem(q, ans, d)


def daily_rate(rng: random.Random) -> Problem:
    (name, pron), _ = _people(rng)
    verb, unit = rng.choice(ACTIVITIES)
    r, days, extra = rng.randint(2, 15), rng.randint(2, 9), rng.randint(1, 30)
    x = r * days
    y = x + extra
    q = (f"{name} {verb} {r} {unit} every day for {days} days. Then {pron} {verb} {extra} more {unit}. "
         f"How many {unit} does {name} {verb[:-1]} in total?")
    a = (f"In {days} days {pron} {verb} {r} * {days} = {x} {unit}. With the extra {unit} that is "
         f"{x} + {extra} = {y} {unit}. {_boxed(y)}")
    return Problem(q, a, y)


def sharing(rng: random.Random) -> Problem:
    (name, pron), _ = _people(rng)
    item = rng.choice(ITEMS)
    k, each, keep = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
    rest = k * each
    total = rest + keep
    q = (f"{name} has {total} {item}. {pron.capitalize()} keeps {keep} {item} and shares the rest equally "
         f"among {k} friends. How many {item} does each friend get?")
    a = (f"{name} shares {total} - {keep} = {rest} {item}. Each friend gets {rest} / {k} = {each} {item}. "
         f"{_boxed(each)}")
    return Problem(q, a, each)


def change_from_bill(rng: random.Random) -> Problem:
    (name, pron), _ = _people(rng)
    item = rng.choice(ITEMS)
    n, p = rng.randint(2, 9), rng.randint(2, 15)
    cost = n * p
    bill = next(b for b in (20, 50, 100, 200) if b >= cost + 1)
    change = bill - cost
    q = (f"{name} buys {n} {item} that cost ${p} each. {pron.capitalize()} pays with a ${bill} bill. "
         f"How many dollars of change does {pron} get?")
    a = (f"The {item} cost {n} * {p} = {cost} dollars. The change is {bill} - {cost} = {change} dollars. "
         f"{_boxed(change)}")
    return Problem(q, a, change)


def times_as_many(rng: random.Random) -> Problem:
    (name, _), (friend, fpron) = _people(rng)
    item = rng.choice(ITEMS)
    a, k = rng.randint(2, 20), rng.randint(2, 6)
    b = a * k
    lost = rng.randint(1, b - 1)
    c = b - lost
    q = (f"{name} has {a} {item}. {friend} has {k} times as many {item} as {name}, but {fpron} loses {lost} "
         f"of them. How many {item} does {friend} have now?")
    ans = (f"{friend} had {a} * {k} = {b} {item}. After losing {lost}, {fpron} has {b} - {lost} = {c} {item}. "
           f"{_boxed(c)}")
    return Problem(q, ans, c)


TEMPLATES: list[Callable[[random.Random], Problem]] = [
    packs_given_away, two_prices, more_than, daily_rate, sharing, change_from_bill, times_as_many,
]


def generate(seed: int, exclude: Iterable[str] = ()) -> Iterator[Problem]:
    """An endless seeded stream of problems, skipping every question in `exclude`."""
    rng = random.Random(seed)
    skip = set(exclude)
    while True:
        p = rng.choice(TEMPLATES)(rng)
        if p.question not in skip:
            yield p


def evaluation_set(size: int = EVAL_SIZE, seed: int = EVAL_SEED) -> list[Problem]:
    """The fixed evaluation set: `size` distinct questions from the evaluation seed."""
    seen: set[str] = set()
    out: list[Problem] = []
    for p in generate(seed):
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
            if len(out) == size:
                return out
    raise AssertionError("unreachable: the stream is endless")


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> None:
    """Problems as JSONL with `question` and `answer` (the solution; gold = its \\boxed{} number)."""
    lines = [json.dumps({"question": p.question, "answer": p.answer}) for p in problems]
    Path(path).write_text("\n".join(lines) + "\n")


def chat_prompt(question: str, bos: str = "<s>") -> str:
    """The question through `nld_trt.tiny.CHAT_TEMPLATE` (one user turn, generation prompt, no thinking).

    Spelled out here so that 100k training prompts skip the Jinja renderer; the recipe checks at start-up
    that it renders exactly like the template.
    """
    return f"{bos}[INST]{question}[/INST]"
