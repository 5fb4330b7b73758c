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
from dataclasses import dataclass, field
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
    kind: str = ""  # the template that made it ("followup:..." for a follow-up question)
    facts: dict = field(default_factory=dict, compare=False, repr=False)  # its quantities, for follow-ups


def boxed(value: object) -> str:
    """The answer line every training answer ends with (what `extract_answer` reads)."""
    return f"The answer is \\boxed{{{value}}}."


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
         f"{total} - {g} = {left} {item} left. {boxed(left)}")
    return Problem(q, a, left, "packs_given_away", dict(name=name, pron=pron, friend=friend, item=item, pack=pack,
                   packs=packs, p=p, n=n, g=g, total=total, left=left))


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
         f"In total {pron} spends {x} + {y} = {z} dollars. {boxed(z)}")
    return Problem(q, a, z, "two_prices", dict(name=name, pron=pron, i1=i1, i2=i2, a1=a1, p1=p1, a2=a2, p2=p2,
                   x=x, y=y, z=z))


def more_than(rng: random.Random) -> Problem:
    (name, _), (friend, _) = _people(rng)
    item = rng.choice(ITEMS)
    a, b = rng.randint(5, 60), rng.randint(2, 40)
    c = a + b
    d = a + c
    q = (f"{name} has {a} {item}. {friend} has {b} more {item} than {name}. "
         f"How many {item} do they have together?")
    ans = (f"{friend} has {a} + {b} = {c} {item}. Together they have {a} + {c} = {d} {item}. {boxed(d)}")
    return Problem(q, ans, d, "more_than", dict(name=name, friend=friend, item=item, a=a, b=b, c=c, d=d))


def daily_rate(rng: random.Random) -> Problem:
    (name, pron), _ = _people(rng)
    verb, unit = rng.choice(ACTIVITIES)
    r, days, extra = rng.randint(2, 15), rng.randint(2, 9), rng.randint(1, 30)
    x = r * days
    y = x + extra
    q = (f"{name} {verb} {r} {unit} every day for {days} days. Then {pron} {verb} {extra} more {unit}. "
         f"How many {unit} does {name} {verb[:-1]} in total?")
    a = (f"In {days} days {pron} {verb} {r} * {days} = {x} {unit}. With the extra {unit} that is "
         f"{x} + {extra} = {y} {unit}. {boxed(y)}")
    return Problem(q, a, y, "daily_rate", dict(name=name, pron=pron, verb=verb, unit=unit, r=r, days=days,
                   extra=extra, x=x, y=y))


def sharing(rng: random.Random) -> Problem:
    (name, pron), _ = _people(rng)
    item = rng.choice(ITEMS)
    k, each, keep = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
    rest = k * each
    total = rest + keep
    q = (f"{name} has {total} {item}. {pron.capitalize()} keeps {keep} {item} and shares the rest equally "
         f"among {k} friends. How many {item} does each friend get?")
    a = (f"{name} shares {total} - {keep} = {rest} {item}. Each friend gets {rest} / {k} = {each} {item}. "
         f"{boxed(each)}")
    return Problem(q, a, each, "sharing", dict(name=name, pron=pron, item=item, k=k, each=each, keep=keep,
                   rest=rest, total=total))


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
         f"{boxed(change)}")
    return Problem(q, a, change, "change_from_bill", dict(name=name, pron=pron, item=item, n=n, p=p, cost=cost,
                   bill=bill, change=change))


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
           f"{boxed(c)}")
    return Problem(q, ans, c, "times_as_many", dict(name=name, friend=friend, fpron=fpron, item=item, a=a, k=k,
                   b=b, lost=lost, c=c))


TEMPLATES: list[Callable[[random.Random], Problem]] = [
    packs_given_away, two_prices, more_than, daily_rate, sharing, change_from_bill, times_as_many,
]


# Follow-up questions ------------------------------------------------------------------------------
# A follow-up asks about the previous problem without restating it ("And if she had twice as many?"), so it
# can only be answered from the conversation. Its solution is computed from the previous problem's facts
# and written in the same `a op b = c` style. Each returns None when its numbers would not work out.

def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _other(rng: random.Random, low: int, high: int, not_: int) -> int:
    return rng.choice([v for v in range(low, high + 1) if v != not_])


def _fu(name: str, q: str, a: str, value: int) -> Problem:
    return Problem(q, f"{a} {boxed(value)}", value, f"followup:{name}", {})


def fu_packs_more_given(p: Problem, rng: random.Random) -> Problem | None:
    f = p.facts
    if f["left"] < 2:
        return None
    h = rng.randint(1, f["left"] - 1)
    x = f["left"] - h
    return _fu("packs_more_given",
               f"Then {f['pron']} gives {h} more {f['item']} to {f['friend']}. How many {f['item']} does {f['name']} have left now?",
               f"{f['name']} had {f['left']} {f['item']} left. After giving {h} more to {f['friend']}, {f['pron']} has "
               f"{f['left']} - {h} = {x} {f['item']} left.", x)


def fu_packs_other_count(p: Problem, rng: random.Random) -> Problem | None:
    f = p.facts
    options = [v for v in range(2, 10) if v != f["p"] and v * f["n"] > f["g"]]
    if not options:
        return None
    p2 = rng.choice(options)
    t2 = p2 * f["n"]
    l2 = t2 - f["g"]
    return _fu("packs_other_count", f"And if {f['pron']} had bought {p2} {f['packs']} instead?",
               f"With {p2} {f['packs']}, {f['name']} buys {p2} * {f['n']} = {t2} {f['item']}. After giving {f['g']} to "
               f"{f['friend']}, {f['pron']} has {t2} - {f['g']} = {l2} {f['item']} left.", l2)


def fu_prices_more(p: Problem, rng: random.Random) -> Problem | None:
    f = p.facts
    m = rng.randint(1, 6)
    c = m * f["p1"]
    z2 = f["z"] + c
    return _fu("prices_more", f"And if {f['pron']} buys {m} more {f['i1']}?",
               f"{m} more {f['i1']} cost {m} * {f['p1']} = {c} dollars. In total {f['pron']} spends {f['z']} + {c} = "
               f"{z2} dollars.", z2)


def fu_prices_difference(p: Problem, rng: random.Random) -> Problem | None:
    f = p.facts
    if f["x"] == f["y"]:
        return None
    (hi, vhi), (lo, vlo) = sorted([(f["i1"], f["x"]), (f["i2"], f["y"])], key=lambda t: -t[1])
    d = vhi - vlo
    return _fu("prices_difference", f"How many more dollars does {f['pron']} spend on the {hi} than on the {lo}?",
               f"The {hi} cost {vhi} dollars and the {lo} cost {vlo} dollars. The difference is {vhi} - {vlo} = {d} "
               "dollars.", d)


def fu_more_than_twice(p: Problem, rng: random.Random) -> Problem | None:
    f = p.facts
    a2 = f["a"] * 2
    c2 = a2 + f["b"]
    d2 = a2 + c2
    return _fu("more_than_twice", f"And if {f['name']} had twice as many {f['item']}?",
               f"{f['name']} would have {f['a']} * 2 = {a2} {f['item']}. {f['friend']} would have {a2} + {f['b']} = {c2} "
               f"{f['item']}. Together they would have {a2} + {c2} = {d2} {f['item']}.", d2)


def fu_more_than_gift(p: Problem, rng: random.Random) -> Problem | None:
    f = p.facts
    h = rng.randint(1, f["c"])
    e = f["a"] + h
    return _fu("more_than_gift", f"Then {f['friend']} gives {h} {f['item']} to {f['name']}. How many {f['item']} does "
               f"{f['name']} have now?",
               f"{f['name']} had {f['a']} {f['item']}. After getting {h} from {f['friend']}, {f['name']} has {f['a']} + {h} = "
               f"{e} {f['item']}.", e)


def fu_daily_more_days(p: Problem, rng: random.Random) -> Problem | None:
    f = p.facts
    k = rng.randint(2, 6)
    m = f["r"] * k
    y2 = f["y"] + m
    return _fu("daily_more_days", f"And if {f['pron']} kept going for {k} more days?",
               f"In {k} more days {f['pron']} {f['verb']} {f['r']} * {k} = {m} more {f['unit']}. In total that is "
               f"{f['y']} + {m} = {y2} {f['unit']}.", y2)


def fu_daily_other_rate(p: Problem, rng: random.Random) -> Problem | None:
    f = p.facts
    r2 = _other(rng, 2, 15, f["r"])
    x2 = r2 * f["days"]
    y2 = x2 + f["extra"]
    return _fu("daily_other_rate", f"And if {f['pron']} {f['verb']} {r2} {f['unit']} every day instead?",
               f"In {f['days']} days {f['pron']} {f['verb']} {r2} * {f['days']} = {x2} {f['unit']}. With the extra "
               f"{f['unit']} that is {x2} + {f['extra']} = {y2} {f['unit']}.", y2)


def fu_sharing_other_keep(p: Problem, rng: random.Random) -> Problem | None:
    f = p.facts
    options = [e for e in range(1, 13) if e != f["each"] and f["total"] - f["k"] * e >= 1]
    if not options:
        return None
    each2 = rng.choice(options)
    rest2 = f["k"] * each2
    keep2 = f["total"] - rest2
    return _fu("sharing_other_keep", f"And if {f['pron']} kept {keep2} {f['item']} instead?",
               f"{f['name']} shares {f['total']} - {keep2} = {rest2} {f['item']}. Each friend gets {rest2} / {f['k']} = "
               f"{each2} {f['item']}.", each2)


def fu_sharing_eaten(p: Problem, rng: random.Random) -> Problem | None:
    f = p.facts
    if f["each"] < 2:
        return None
    e = rng.randint(1, f["each"] - 1)
    x = f["each"] - e
    return _fu("sharing_eaten", f"Then each friend uses {e} of them. How many {f['item']} does each friend have left?",
               f"Each friend got {f['each']} {f['item']}. After using {e}, each friend has {f['each']} - {e} = {x} "
               f"{f['item']} left.", x)


def fu_change_other_bill(p: Problem, rng: random.Random) -> Problem | None:
    f = p.facts
    bills = [b for b in (20, 50, 100, 200) if b > f["cost"] and b != f["bill"]]
    if not bills:
        return None
    bill2 = rng.choice(bills)
    ch2 = bill2 - f["cost"]
    return _fu("change_other_bill", f"And if {f['pron']} pays with a ${bill2} bill?",
               f"The {f['item']} cost {f['cost']} dollars. The change is {bill2} - {f['cost']} = {ch2} dollars.", ch2)


def fu_change_other_count(p: Problem, rng: random.Random) -> Problem | None:
    f = p.facts
    options = [m for m in range(2, 10) if m != f["n"] and m * f["p"] < f["bill"]]
    if not options:
        return None
    n2 = rng.choice(options)
    cost2 = n2 * f["p"]
    ch2 = f["bill"] - cost2
    return _fu("change_other_count", f"And if {f['pron']} buys {n2} {f['item']}?",
               f"The {f['item']} cost {n2} * {f['p']} = {cost2} dollars. The change is {f['bill']} - {cost2} = {ch2} "
               "dollars.", ch2)


def fu_times_other_factor(p: Problem, rng: random.Random) -> Problem | None:
    f = p.facts
    options = [v for v in range(2, 7) if v != f["k"] and f["a"] * v > f["lost"]]
    if not options:
        return None
    k2 = rng.choice(options)
    b2 = f["a"] * k2
    c2 = b2 - f["lost"]
    return _fu("times_other_factor", f"And if {f['friend']} had {k2} times as many {f['item']} as {f['name']}?",
               f"{f['friend']} would have had {f['a']} * {k2} = {b2} {f['item']}. After losing {f['lost']}, {f['fpron']} "
               f"would have {b2} - {f['lost']} = {c2} {f['item']}.", c2)


def fu_times_found(p: Problem, rng: random.Random) -> Problem | None:
    f = p.facts
    h = rng.randint(1, 30)
    c3 = f["c"] + h
    return _fu("times_found", f"Then {f['friend']} finds {h} {f['item']}. How many {f['item']} does {f['friend']} have now?",
               f"{f['friend']} had {f['c']} {f['item']}. After finding {h}, {f['fpron']} has {f['c']} + {h} = {c3} "
               f"{f['item']}.", c3)


FOLLOWUPS: dict[str, list[Callable[[Problem, random.Random], Problem | None]]] = {
    "packs_given_away": [fu_packs_more_given, fu_packs_other_count],
    "two_prices": [fu_prices_more, fu_prices_difference],
    "more_than": [fu_more_than_twice, fu_more_than_gift],
    "daily_rate": [fu_daily_more_days, fu_daily_other_rate],
    "sharing": [fu_sharing_other_keep, fu_sharing_eaten],
    "change_from_bill": [fu_change_other_bill, fu_change_other_count],
    "times_as_many": [fu_times_other_factor, fu_times_found],
}


def followup(problem: Problem, rng: random.Random) -> Problem | None:
    """A follow-up question about `problem` with its computed solution, or None (a follow-up itself, or
    no follow-up whose numbers work out)."""
    makers = list(FOLLOWUPS.get(problem.kind, ()))
    rng.shuffle(makers)
    for make in makers:
        f = make(problem, rng)
        if f is not None:
            return f
    return None


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


# Conversations --------------------------------------------------------------------------------------
# A training example is a conversation: a list of OpenAI-style messages {"role", "content"} ending with an
# assistant turn. `content` is text here; the VLM's picture conversations (`pictures.py`) put image parts in a
# user message's content, which `render` hands to the checkpoint's prompt encoder: nothing here looks inside.

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a careful math tutor. Solve each problem step by step.",
    "Answer the question and put the final answer in \\boxed{}.",
    "You are a friendly assistant who explains arithmetic clearly.",
    "Solve the word problems the user asks, one at a time.",
    "Be concise.",
]


@dataclass(frozen=True)
class ConversationMix:
    """The shape of the training conversations: `p_single` of them are one question; the rest have 1 to
    `max_history` earlier question / answer turns (uniformly) before the last question. After a problem,
    the next question is a follow-up about it with probability `p_followup`. `p_system` of all
    conversations open with a system prompt."""

    p_single: float = 0.2
    max_history: int = 4
    p_followup: float = 0.35
    p_system: float = 0.3


def qa_messages(turns: list[Problem], system: str | None = None) -> list[dict]:
    """The messages of a conversation of solved problems: [system,] user, assistant, user, assistant, ..."""
    out = [{"role": "system", "content": system}] if system else []
    for p in turns:
        out += [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.answer}]
    return out


def conversations(seed: int, exclude: Iterable[str] = (), mix: ConversationMix = ConversationMix()) -> Iterator[list[dict]]:
    """An endless seeded stream of training conversations (messages ending with an assistant turn). Every
    problem comes from `generate(seed, exclude)`, so no evaluation question (nor a follow-up about one)
    ever appears; follow-ups are asked only about the problem just before them."""
    problems = generate(seed, exclude)
    rng = random.Random(f"conversations-{seed}")
    while True:
        n = 1 if rng.random() < mix.p_single else 1 + rng.randint(1, mix.max_history)
        turns: list[Problem] = []
        while len(turns) < n:
            turns.append(next(problems))
            if len(turns) < n and rng.random() < mix.p_followup:
                f = followup(turns[-1], rng)
                if f is not None:
                    turns.append(f)
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < mix.p_system else None
        yield qa_messages(turns, system)


@dataclass(frozen=True)
class Rendered:
    """A conversation as the model sees it: token ids, and the [start, end) ranges of the assistant turns
    that carry the loss (each the answer's tokens and the EOS the template closes it with). With images:
    each image's span of positions (`nld_trt.prompt.ImageSpan`) and its prepared pixels, in prompt order."""

    ids: list[int]
    spans: list[tuple[int, int]]
    images: tuple = ()
    pixels: tuple = field(default=(), compare=False, repr=False)


def render(tokenizer, messages: list[dict], loss_on: str = "all", prompts=None) -> Rendered:
    """Token ids of `messages` (ending with an assistant turn) through the checkpoint's chat template, exactly
    as serving renders a conversation: every loss span starts where the prompt serving builds for the turn ends
    (`tokenizer.encode_chat(messages[:i])`, or with images `prompts.messages(messages[:i])`: the calls the
    prompt encoder, nld_trt/prompt.py, makes for the OpenAI front end, the Triton model and `generate`).

    `tokenizer` is an `nld_trt.tokenizer.NLDTokenizer`; `prompts` the checkpoint's `nld_trt.prompt.PromptEncoder`,
    needed for user turns with image parts (it expands each image into its positions as serving does);
    `loss_on` is "all" (every assistant turn) or "last". A template that does not render a conversation as a
    prefix of its continuation (one that rewrites earlier turns) is refused: its training text would differ
    from what serving sends."""
    if loss_on not in ("all", "last"):
        raise ValueError(f"loss_on must be 'all' or 'last', got {loss_on!r}")
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a training conversation ends with an assistant turn")

    def rendered(upto: int, generation: bool):
        if prompts is not None:
            return prompts.messages(messages[:upto], local_files=False, add_generation_prompt=generation)
        text = tokenizer.apply_chat_template(messages[:upto], add_generation_prompt=generation)
        return tokenizer.encode(text, add_special_tokens=False)

    def ids_of(upto: int, generation: bool = False) -> list[int]:
        r = rendered(upto, generation)
        return r if prompts is None else r.ids

    whole = rendered(len(messages), False)
    ids = whole if prompts is None else whole.ids
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = []
    for i in turns if loss_on == "all" else turns[-1:]:
        prompt = ids_of(i, generation=True)
        end = len(ids) if i == len(messages) - 1 else len(ids_of(i + 1))
        if ids[: len(prompt)] != prompt or (end < len(ids) and ids[:end] != ids_of(i + 1)):
            raise ValueError(f"the chat template does not render turn {i} as a prefix of the whole conversation: "
                             "its training text would differ from what serving sends")
        spans.append((len(prompt), end))
    if prompts is None:
        return Rendered(ids, spans)
    return Rendered(ids, spans, whole.images, whole.pixels)


# The conversation evaluation set ----------------------------------------------------------------------

CONVERSATION_TURNS = 4


def conversation_evaluation_set(size: int = EVAL_SIZE, seed: int = EVAL_SEED) -> list[dict]:
    """Each evaluation question asked as turn k = 1..4 of a conversation whose earlier turns are other
    evaluation problems with their worked solutions, plus a follow-up variant (the question and its solution,
    then a follow-up about it); a quarter of the questions open every variant with a system prompt.

    Rows: {"messages" (ending with the user turn to answer), "answer" (the gold solution), "index" (the
    question's place in `evaluation_set`), "group" ("turn 1".."turn 4", "followup")}. Only evaluation
    problems appear, so the set stays disjoint from the training stream."""
    problems = evaluation_set(size, seed)
    rng = random.Random(f"conversation-eval-{seed}")
    rows: dict[str, list[dict]] = {f"turn {k}": [] for k in range(1, CONVERSATION_TURNS + 1)}
    rows["followup"] = []
    for i, p in enumerate(problems):
        others = rng.sample([j for j in range(len(problems)) if j != i], CONVERSATION_TURNS - 1)
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.25 else None
        for k in range(1, CONVERSATION_TURNS + 1):
            history = qa_messages([problems[j] for j in others[: k - 1]], system)
            rows[f"turn {k}"].append({"messages": history + [{"role": "user", "content": p.question}],
                                      "answer": p.answer, "index": i, "group": f"turn {k}"})
        f = followup(p, rng)
        if f is None:  # every template has a follow-up that always works out
            raise AssertionError(f"no follow-up for {p.question!r}")
        rows["followup"].append({"messages": qa_messages([p], system) + [{"role": "user", "content": f.question}],
                                 "answer": f.answer, "index": i, "group": "followup"})
    return [r for group in rows.values() for r in group]
