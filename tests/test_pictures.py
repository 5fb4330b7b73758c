"""The tiny VLM's training data (`nld_trt.training.pictures`) and the joint objective with images: seeded
pictures whose answers are right, an evaluation set no training picture repeats, conversations rendered as
serving renders them (images expanded by the prompt encoder), and image rows in both copies of a batch."""

from __future__ import annotations

import base64
import collections
import io
import itertools
import json
import random
import re

import numpy as np
import pytest
import torch

from nld_trt.evaluate import extract_answer, gold_answer
from nld_trt.serving.protocol import Limits, prepare
from nld_trt.tiny import IMAGE_PAD_ID, VLM_EOS_ID
from nld_trt.training import data, pictures
from nld_trt.training.objective import CLEAN, IGNORE, NOISY, Example, ExampleImage, input_embeddings, joint_loss, make_batch

LIMITS = Limits(max_tokens_cap=64, default_max_tokens=8, streaming=True, max_prompt_bytes=1 << 22)


def pixels(scene: pictures.Scene) -> np.ndarray:
    return np.asarray(scene.draw())


def test_pictures_are_seeded_and_drawn_the_same_every_time():
    a = list(itertools.islice(pictures.items(5), 40))
    assert a == list(itertools.islice(pictures.items(5), 40))
    assert a != list(itertools.islice(pictures.items(6), 40))
    assert {it.question.kind for it in a} == set(pictures.TRAIN_KINDS)
    for it in a[:10]:
        assert np.array_equal(pixels(it.scene), pixels(it.scene))
        assert it.scene.draw().size == it.scene.size and max(it.scene.size) <= 224
    # the README's sample picture is the one `sample-image` draws, and no kind's sample is an evaluation picture
    from pathlib import Path

    from PIL import Image

    s = pictures.sample()
    readme = Image.open(Path(__file__).parents[1] / "docs" / "tiny-vlm-sample.png").convert("RGB")
    assert np.array_equal(np.asarray(readme), pixels(s.scene)) and s.question.kind == pictures.SAMPLE_KIND
    evaluated = {it.scene.key for it in pictures.evaluation_items()}
    assert not {pictures.sample(kind).scene.key for kind in pictures.KINDS} & evaluated


def test_every_answer_is_what_the_picture_shows():
    rng = random.Random(3)
    for kind in pictures.KINDS:
        for _ in range(40):
            it = pictures.item(kind, rng)
            q, scene = it.question, it.scene
            assert q.answer.endswith(pictures.boxed(q.value)) and extract_answer(q.answer) == gold_answer(q.answer) == q.value
            img = pixels(scene)
            if kind == "count":
                n = int(q.value)
                if "bars" in q.question:
                    assert n == len(scene.items)
                else:  # the question's colour / shape filter, counted in the scene
                    words = q.question.lower().replace("?", "").replace(".", "").split()
                    colour = next((c for c in pictures.COLOURS if c in words), None)
                    shape = next((s for s in pictures.SHAPES if s + "s" in words), None)
                    assert n == sum((colour is None or s.colour == colour) and (shape is None or s.shape == shape)
                                    for s in scene.items) >= 1
            elif kind == "colour":
                (s,) = [s for s in scene.items if f"the {s.shape}?" in q.question]
                assert q.value == s.colour
                assert tuple(img[s.y, s.x]) == pictures.COLOURS[s.colour]  # its centre has its colour
            elif kind == "shape":
                colour = next(c for c in pictures.COLOURS if re.search(rf"\b{c}\b", q.question))
                (s,) = [s for s in scene.items if s.colour == colour]
                assert q.value == s.shape
            elif kind == "position":
                m = re.match(r"The (.+) is (\d)(?:st|nd|rd|th) from the (left|top), the (.+) (\d)(?:st|nd|rd|th)\. The answer",
                             q.answer)
                (a,), (b,) = ([s for s in scene.items if s.describe(scene) == d] for d in (m[1], m[4]))
                axis = "x" if q.value in ("left", "right") else "y"
                along = sorted(scene.items, key=lambda s: (s.x, s.y) if axis == "x" else (s.y, s.x))
                # each shape's rank along the axis asked about
                assert (int(m[2]), m[3], int(m[5])) == (along.index(a) + 1, {"x": "left", "y": "top"}[axis],
                                                        along.index(b) + 1)
                assert f"the {m[1]} " in q.question and q.question.endswith(f"the {m[4]}?")
                gap = {"left": b.x - a.x, "right": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[q.value]
                assert gap >= 28
            elif kind == "digit":
                assert q.value == str(scene.items[0].value)
            else:
                heights = {b.colour: b.height for b in scene.items}
                pick = max if "tallest" in q.question else min
                assert q.value == pick(heights, key=heights.get) and len(set(heights.values())) == len(heights)


def test_a_description_names_every_object_left_to_right():
    rng = random.Random(4)
    for _ in range(30):
        it = pictures.item("describe", rng)
        scene, answer = it.scene, it.question.answer
        if scene.kind == "shapes":
            named = re.findall(r"an? (\w+) (circle|square|triangle)", answer)
            assert named == [(s.colour, s.shape) for s in sorted(scene.items, key=lambda s: (s.x, s.y))]
        elif scene.kind == "bars":
            assert all(b.colour in answer for b in scene.items) and f"{len(scene.items)} bars" in answer
        else:
            assert answer == f"I see the digit {scene.items[0].value} in {scene.items[0].colour}."
    assert "describe" not in {r["group"] for r in pictures.evaluation_set(per_kind=5)}


def test_cell_labels_say_what_covers_each_28_pixel_cell():
    square = pictures.Shape("square", "blue", 84, 84, 28)  # exactly cells (2, 2) .. (3, 3)
    scene = pictures.Scene("shapes", (224, 168), (255, 255, 255), (square,))
    labels = scene.cell_labels()
    assert labels.shape == (6, 8, len(pictures.CELL_HEADS))
    blue, kind = list(pictures.COLOURS).index("blue") + 1, pictures.CELL_KINDS.index("square")
    inside = np.zeros((6, 8), dtype=bool)
    inside[2:4, 2:4] = True
    assert (labels[inside][:, :2] == (blue, kind)).all() and (labels[~inside][:, :2] == 0).all()
    digit = pictures.Scene("digit", (224, 224), (255, 255, 255), (pictures.Digit(1, "red", 100, 20, 60, 180, 20),))
    kinds = digit.cell_labels()[..., 1]
    assert set(np.unique(kinds)) == {0, pictures.CELL_KINDS.index("digit")}
    assert (kinds[:, :4] == 0).all() and (kinds[1:6, 5] == pictures.CELL_KINDS.index("digit")).all()  # the right stroke
    values = digit.cell_labels()[..., list(pictures.CELL_HEADS).index("digit")]
    assert ((values == 1) == (kinds > 0)).all() and (values[kinds == 0] == IGNORE).all()  # its value on its cells only
    with pytest.raises(ValueError, match="not whole 28-pixel cells"):
        pictures.Scene("shapes", (200, 200), (255, 255, 255), (square,)).cell_labels()
    # training pictures carry them; the evaluation's do not need them
    conv = next(c for c in pictures.conversations(0) if isinstance(c[-2]["content"], list) or isinstance(c[0]["content"], list))
    part = next(p for m in conv if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")
    assert part["cells"].shape[:2] == (part["image"].size[1] // 28, part["image"].size[0] // 28)
    assert all("cells" not in p for r in pictures.evaluation_set(per_kind=2) for m in r["messages"]
               if isinstance(m["content"], list) for p in m["content"])


def test_cell_labels_put_counts_and_ranks_on_each_shapes_cells():
    """Each shape's cells carry how many shapes share its colour and shape, its colour, its shape, the picture's
    object count and its ranks left to right and top to bottom; cells off the shapes carry only the count."""
    items = (pictures.Shape("square", "blue", 42, 42, 14),  # cell (1, 1)
             pictures.Shape("square", "blue", 154, 98, 14),  # cell (3, 5)
             pictures.Shape("circle", "blue", 98, 154, 14),  # cell (5, 3)
             pictures.Shape("square", "red", 182, 14, 14))  # cell (0, 6)
    labels = pictures.Scene("shapes", (224, 224), (255, 255, 255), items).cell_labels()
    head = {name: labels[..., k] for k, name in enumerate(pictures.CELL_HEADS)}
    cells = [(1, 1), (3, 5), (5, 3), (0, 6)]
    assert [int(head["same"][c]) for c in cells] == [2, 2, 1, 1]
    assert [int(head["same_colour"][c]) for c in cells] == [3, 3, 3, 1]
    assert [int(head["same_shape"][c]) for c in cells] == [3, 3, 1, 3]
    assert [int(head["x_rank"][c]) for c in cells] == [0, 2, 1, 3]
    assert [int(head["y_rank"][c]) for c in cells] == [1, 2, 3, 0]
    assert (head["objects"] == 4).all() and (head["digit"] == IGNORE).all()
    assert sorted(zip(*np.nonzero(head["centre"]))) == sorted(cells)  # one cell per shape: its centre's
    # which side of each other shape a name picks out: the two blue squares only by no name ("square": 3 of them,
    # "blue square": 2), the circle as "circle" and "blue circle", the red square as "red square"
    sides = {name[2:] for name in pictures.CELL_HEADS if name.startswith("x:") and (head[name] != IGNORE).any()}
    assert sides == {"circle", "blue circle", "red square"}
    assert [int(head["x:circle"][c]) for c in cells] == [0, 1, IGNORE, 1]
    assert [int(head["y:circle"][c]) for c in cells] == [0, 0, IGNORE, 0]
    assert [int(head["x:red square"][c]) for c in cells] == [0, 0, 0, IGNORE]
    assert [int(head["y:red square"][c]) for c in cells] == [1, 1, 1, IGNORE]
    off = head["kind"] == 0
    assert int(off.sum()) == 64 - 4 and all((head[name][off] == IGNORE).all() for name in
                                            ("same", "same_colour", "same_shape", "x_rank", "y_rank"))
    # the labels' classes fit the probe's heads, over many training pictures
    rng = random.Random(0)
    sizes = np.array(list(pictures.CELL_HEADS.values()))
    for _ in range(60):
        got = pictures.item(rng.choice(pictures.TRAIN_KINDS), rng).scene.cell_labels().reshape(-1, len(sizes))
        assert ((got == IGNORE) | ((got >= 0) & (got < sizes))).all()


def test_training_asks_the_hardest_kinds_first_most_often():
    firsts = collections.Counter(it.question.kind for it in itertools.islice(pictures.items(0), 1400))
    assert set(firsts) == set(pictures.TRAIN_KINDS)
    for hard in ("count", "position", "digit", "describe"):  # weight 2 against 1: 200 vs 100 expected
        assert 1.4 < firsts[hard] / firsts["colour"] < 2.8, firsts


def test_digits_are_seven_segment_drawings_that_differ():
    rng = random.Random(0)
    drawn = {}
    for _ in range(200):
        it = pictures.item("digit", rng)
        g = it.scene.items[0]
        box = pixels(pictures.Scene("digit", (224, 224), (255, 255, 255), (pictures.Digit(g.value, "blue", 40, 20, 80, 160, 16),)))
        drawn[g.value] = box
    assert len(drawn) == 10
    ink = {v: (img != 255).any(axis=2) for v, img in drawn.items()}
    assert len({m.tobytes() for m in ink.values()}) == 10  # ten different shapes
    assert ink[8].sum() > ink[1].sum() and (ink[8] >= ink[0]).all()  # 8 has every segment


def test_the_evaluation_set_is_fixed_and_no_training_picture_is_in_it():
    rows = pictures.evaluation_set(per_kind=20)
    again = pictures.evaluation_set(per_kind=20)
    assert [r["answer"] for r in rows] == [r["answer"] for r in again]
    assert [json.dumps(r["messages"], default=lambda im: pixels_digest(im)) for r in rows] == \
           [json.dumps(r["messages"], default=lambda im: pixels_digest(im)) for r in again]
    groups = collections.Counter(r["group"] for r in rows)
    assert groups == {**{k: 20 for k in pictures.KINDS}, "followup": 20, "arithmetic": 20}
    for g in groups:  # numbered per group, so --limit keeps the same questions of every group
        assert sorted(r["index"] for r in rows if r["group"] == g) == list(range(20))
    held_out = {it.scene.key for it in pictures.evaluation_items(per_kind=20)}
    assert len(held_out) == 6 * 20
    # the training stream skips them: even a stream drawn from the evaluation's own generator
    rng = random.Random(f"picture-eval-{pictures.EVAL_SEED}")
    assert all(pictures.item(kind, rng, held_out).scene.key not in held_out for kind in pictures.KINDS for _ in range(20))
    stream = list(itertools.islice(pictures.items(0, held_out), 3000))
    assert not {it.scene.key for it in stream} & held_out
    follow = [r for r in rows if r["group"] == "followup"]
    assert all(len(r["messages"]) == 3 and isinstance(r["messages"][2]["content"], str) for r in follow)


def pixels_digest(image) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


def test_training_conversations_mix_pictures_followups_and_arithmetic():
    exclude = {p.question for p in data.evaluation_set()}
    convs = list(itertools.islice(pictures.conversations(1, exclude_questions=exclude), 600))
    with_image = [c for c in convs if any(isinstance(m["content"], list) for m in c)]
    assert 0.7 < len(with_image) / len(convs) < 0.9  # p_text 0.2: the rest are arithmetic only
    assert any(sum(isinstance(m["content"], list) for m in c) == 2 for c in convs)  # a second picture
    assert any(sum(m["role"] == "user" for m in c) >= 3 for c in with_image)  # follow-ups
    assert any(c[0]["role"] == "system" for c in with_image)
    orders = {tuple(p["type"] for p in m["content"]) for c in with_image for m in c if isinstance(m["content"], list)}
    assert orders == {("image", "text"), ("text", "image")}
    for c in convs:
        assert c[-1]["role"] == "assistant" and all(m["content"] not in exclude for m in c if isinstance(m["content"], str))
        # exact answers end boxed; a description (training only) names what is drawn
        assert all(m["content"].endswith("}.") or m["content"].startswith("I see ") for m in c if m["role"] == "assistant")
    said = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
    assert 0.05 < sum(a.startswith("I see ") for a in said) / len(said) < 0.3


def test_a_rendered_picture_conversation_is_what_a_served_request_sends(tiny_vlm):
    """Training's rendering (PIL images through the checkpoint's prompt encoder) gives, before each answer,
    exactly the ids the Triton model builds for a `messages` request sending the same pictures as PNG data
    URLs; each answer is its tokens and <|im_end|>; every pad is an image row in prompt order."""
    tok = tiny_vlm.tokenizer
    convs = [c for c in itertools.islice(pictures.conversations(2), 40) if any(isinstance(m["content"], list) for m in c)]
    assert len(convs) > 20
    for c in convs[:12]:
        r = data.render(tok, c, prompts=tiny_vlm.prompts)
        answers = [i for i, m in enumerate(c) if m["role"] == "assistant"]
        assert len(r.spans) == len(answers) and len(r.images) == sum(isinstance(m["content"], list) for m in c)
        assert [p for s in r.images for p in s.pad_positions()] == [i for i, t in enumerate(r.ids) if t == IMAGE_PAD_ID]
        for i, (s0, s1) in zip(answers, r.spans):
            served = prepare(tiny_vlm, {"messages": json.dumps(as_request(c[:i]))}, LIMITS)
            assert r.ids[:s0] == served.prompt_ids
            assert r.ids[s0:s1] == tok.encode(c[i]["content"], add_special_tokens=False) + [VLM_EOS_ID]
        assert data.render(tok, c, "last", tiny_vlm.prompts).spans == r.spans[-1:]


def as_request(messages: list[dict]) -> list[dict]:
    """The OpenAI shape of a training conversation: each PIL image as a PNG data URL."""
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            out.append(m)
            continue
        parts = []
        for p in m["content"]:
            if p["type"] == "image":
                buf = io.BytesIO()
                p["image"].save(buf, format="PNG")
                url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
                parts.append({"type": "image_url", "image_url": {"url": url}})
            else:
                parts.append(p)
        out.append({**m, "content": parts})
    return out


def test_image_rows_replace_the_pads_in_both_copies_and_train_the_tower(tiny_vlm):
    """A batch's image slots (clean copy, and a noisy block reaching back into the picture) take the
    encoder's rows; other slots keep their token embeddings; the loss reaches the tower's weights."""
    from nld_trt.tiny import tiny_vlm_config
    from nld_trt.vision.tower import VisionEncoder

    tok, prompts = tiny_vlm.tokenizer, tiny_vlm.prompts
    it = pictures.sample("digit")
    conv = [pictures.image_turn(it.scene, "?"), {"role": "assistant", "content": it.question.answer}]
    r = data.render(tok, conv, prompts=prompts)
    (span,) = r.images
    pads = span.pad_positions()
    cells = torch.from_numpy(it.scene.cell_labels().reshape(-1, len(pictures.CELL_HEADS)))
    ex = Example(r.ids, r.spans, [ExampleImage(pads, r.pixels[0].pixels, cells)])
    rt = data.render(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "2"}])
    text = Example(rt.ids, rt.spans)
    g = torch.Generator().manual_seed(0)
    s0 = r.spans[0][0]
    found_noisy_pad = False
    for _ in range(30):  # random phases: some first block starts inside the picture (b = 32 > the question)
        batch = make_batch([text, ex], 32, 100, VLM_EOS_ID, g)
        assert batch.images and len(batch.images) == 1 and (batch.image_index[0] == -1).all()
        row = batch.image_index[1]
        clean = (batch.kind[1] == CLEAN).nonzero().flatten()
        assert row[clean].tolist() == [pads.index(p) if p in pads else -1 for p in range(len(r.ids))]
        noisy = (batch.kind[1] == NOISY).nonzero().flatten()
        for j in noisy.tolist():
            p = int(batch.positions[1, j])
            assert int(row[j]) == (pads.index(p) if p in pads else -1)
            found_noisy_pad |= p in pads
        assert int(batch.positions[1, noisy[0]]) > s0 - 32
    assert found_noisy_pad
    assert torch.equal(batch.cells, cells)  # the probe's labels line up with the batch's image rows
    unlabelled = make_batch([Example(r.ids, r.spans, [ExampleImage(pads, r.pixels[0].pixels)])], 8, 100, VLM_EOS_ID, g)
    assert (unlabelled.cells == IGNORE).all()

    torch.manual_seed(0)
    config = tiny_vlm_config()
    vision = VisionEncoder(config)
    model = tiny_vlm.model
    embeds = input_embeddings(model, batch, vision)
    plain = model.embed(batch.tokens)
    rows = vision([batch.images[0]])[0]
    image = batch.image_index >= 0
    assert torch.equal(embeds[~image], plain[~image])
    assert torch.allclose(embeds[image], rows[batch.image_index[image]])
    heads = tuple(pictures.CELL_HEADS.values())
    probe = torch.nn.Linear(config.text.hidden_size, sum(heads))
    loss = joint_loss(model, batch, 1.0, vision, probe, heads)
    assert loss.cells is not None and loss.cells > 0
    loss.total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*vision.parameters(), *probe.parameters()])
    assert joint_loss(model, unlabelled, 1.0, vision, probe, heads).cells is None
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="needs the vision encoder"):
        input_embeddings(model, batch, None)


def test_the_probe_loss_counts_each_label_only_where_it_applies():
    import torch.nn.functional as F

    from nld_trt.training.objective import cell_loss

    torch.manual_seed(0)
    rows, heads = torch.randn(5, 8), (3, 4)
    probe = torch.nn.Linear(8, sum(heads))
    cells = torch.tensor([[0, IGNORE], [1, 2], [2, IGNORE], [0, 3], [1, 0]])
    colour, other = probe(rows).split(list(heads), dim=-1)
    on = cells[:, 1] != IGNORE
    want = F.cross_entropy(colour, cells[:, 0]) + F.cross_entropy(other[on], cells[on, 1])
    assert torch.allclose(cell_loss(probe, rows, cells, heads), want)
    assert torch.allclose(cell_loss(probe, rows, cells, heads, (1.0, 0.25)),
                          F.cross_entropy(colour, cells[:, 0]) + 0.25 * F.cross_entropy(other[on], cells[on, 1]))
    cells[:, 1] = IGNORE  # a column no row has contributes nothing (not a NaN)
    assert torch.allclose(cell_loss(probe, rows, cells, heads), F.cross_entropy(colour, cells[:, 0]))
    assert cell_loss(probe, rows, torch.full((5, 2), IGNORE), heads) is None
    with pytest.raises(ValueError, match="3 label columns for a probe of 2 heads"):
        cell_loss(probe, rows, torch.zeros(5, 3, dtype=torch.long), heads)


def _recipe():
    import importlib.util
    import sys
    from pathlib import Path

    if "train_tiny_nld" not in sys.modules:
        path = Path(__file__).parents[1] / "scripts" / "train_tiny_nld.py"
        spec = importlib.util.spec_from_file_location("train_tiny_nld", path)
        sys.modules["train_tiny_nld"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["train_tiny_nld"]


def test_a_position_answer_looks_at_each_ranked_shape_where_it_writes_its_rank(tiny_vlm):
    """`Question.looks` names the character of each rank and the shape it is read off; the recipe's `example`
    maps them to the token holding that character and the pads of the cells that shape covers most."""
    tok, prompts = tiny_vlm.tokenizer, tiny_vlm.prompts
    rng = random.Random(4)
    for _ in range(6):
        it = pictures.item("position", rng)
        q, scene = it.question, it.scene
        ranks = re.fullmatch(r"The (.+) is (\d)\w\w from the \w+, the (.+) (\d)\w\w\. .*", q.answer)
        (ca, a), (cb, b) = q.looks
        assert (q.answer[ca], q.answer[cb]) == (ranks[2], ranks[4])
        assert (scene.items[a].describe(scene), scene.items[b].describe(scene)) == (ranks[1], ranks[3])
        which = scene.cover_map()
        kinds = scene.cell_labels()[..., list(pictures.CELL_HEADS).index("kind")]
        assert ((which >= 0) == (kinds > 0)).all()  # a cell has an object's facts exactly where it is covered
        conv = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
                pictures.image_turn(scene, q.question, labels=True), pictures.answer_turn(q)]
        r = data.render(tok, conv, prompts=prompts)
        ex = _recipe().example(r, conv, tok)
        pads = r.images[0].pad_positions()
        assert len(ex.looks) == 2
        for (at, keys), (char, obj) in zip(ex.looks, q.looks):
            assert r.spans[1][0] <= at < r.spans[1][1] and q.answer[char] in tok.decode([r.ids[at]])
            assert keys and keys == [p for p, w in zip(pads, which.reshape(-1)) if w == obj]
    # a shape too small to be any cell's (a quarter of each of four cells) has nothing to look at
    small = pictures.Scene("shapes", (224, 224), (255, 255, 255), (pictures.Shape("circle", "red", 28, 28, 10),
                                                                    pictures.Shape("square", "blue", 150, 150, 30)))
    q = pictures.ask_position(small, random.Random(0))
    assert (small.cover_map() == 0).sum() == 0 and len(q.looks) == 2
    conv = [pictures.image_turn(small, q.question, labels=True), pictures.answer_turn(q)]
    r = data.render(tok, conv, prompts=prompts)
    ((at, keys),) = _recipe().example(r, conv, tok).looks
    square = [char for char, obj in q.looks if obj == 1][0]
    assert tok.decode([r.ids[at]]).strip() == q.answer[square] and len(keys) == (small.cover_map() == 1).sum() > 0
    plain = [pictures.image_turn(small, q.question), pictures.answer_turn(q)]  # no cover map to look at
    with pytest.raises(ValueError, match="no picture before it carries a cover map"):
        _recipe().example(data.render(tok, plain, prompts=prompts), plain, tok)
    conv[0]["content"][0]["objects"] = small.cover_map()[:4]
    with pytest.raises(ValueError, match=r"a cover map of shape \(4, 8\) for an image of \(8, 8\) cells"):
        _recipe().example(r, conv, tok)


def test_the_look_loss_is_minus_the_log_of_the_best_heads_attention_on_the_shape(tiny_vlm):
    """From the clean slot before a rank and from the noisy slot of a masked rank, the loss is -log of the
    largest attention mass one head of the layer puts on the shape's cells, as the model's own attention
    computes it (probabilities read back from its attention call); it trains the layer's q and k."""
    import nld_trt.model as M
    from nld_trt.tiny import tiny_vlm_config
    from nld_trt.training.objective import MaskSchedule, look_loss
    from nld_trt.vision.tower import VisionEncoder

    tok, prompts, model = tiny_vlm.tokenizer, tiny_vlm.prompts, tiny_vlm.model
    rng = random.Random(5)
    examples = []
    for _ in range(3):
        it = pictures.item("position", rng)
        conv = [pictures.image_turn(it.scene, it.question.question, labels=True), pictures.answer_turn(it.question)]
        examples.append(_recipe().example(data.render(tok, conv, prompts=prompts), conv, tok))
    batch = make_batch(examples, 8, 100, VLM_EOS_ID, torch.Generator().manual_seed(0), MaskSchedule(p_full=1.0))
    clean = [(r, s) for r, s, _ in batch.looks if batch.kind[r, s] == CLEAN]
    assert len(clean) == 6 and all(tok.decode([int(batch.tokens[r, s + 1])]).strip().isdigit() for r, s in clean)
    # a noisy query for every rank masked (all but those opening a block, which decoding always knows)
    ranks = {(r, int(batch.positions[r, s]) + 1) for r, s in clean}
    masked = {(r, int(batch.positions[r, j])) for r in range(3) for j in range(batch.tokens.shape[1])
              if batch.kind[r, j] == NOISY and batch.tokens[r, j] == 100} & ranks
    noisy = {(r, int(batch.positions[r, s])) for r, s, _ in batch.looks if batch.kind[r, s] == NOISY}
    assert noisy == masked and 0 < len(noisy) < 6 and len(batch.looks) == 6 + len(noisy)
    torch.manual_seed(0)
    vision = VisionEncoder(tiny_vlm_config())
    layer = model.config.num_hidden_layers - 1
    seen, normed = [], []
    real = M.attention

    def spy(q, k, v, mask, scale):  # the probabilities the model's attention call weighs V with
        group = q.shape[1] // k.shape[1]
        keys, values = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        p = ((q @ keys.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf")).softmax(-1)
        out = real(q, k, v, mask, scale)
        assert torch.allclose(p @ values, out, atol=1e-5)  # they are the call's own weights
        seen.append(p)
        return out

    hook = model.encoder.layers[layer].input_layernorm.register_forward_hook(lambda m, a, out: normed.append(out))
    M.attention = spy
    try:
        losses = joint_loss(model, batch, 1.0, vision, look_weight=1.0, look_layer=layer)
    finally:
        M.attention = real
        hook.remove()
    p = seen[layer]
    want = torch.stack([-p[r, :, s, keys].sum(-1).max().log() for r, s, keys in batch.looks]).mean()
    assert losses.looks is not None and want > 0 and abs(losses.looks - want.item()) < 1e-5
    assert torch.allclose(look_loss(model, batch, normed[0], layer), want, atol=1e-5)
    twice = joint_loss(model, batch, 1.0, vision, look_weight=2.0, look_layer=layer)
    off = joint_loss(model, batch, 1.0, vision)
    assert off.looks is None and torch.allclose(twice.total - off.total, 2 * want, atol=1e-4)
    # alone, it trains the layer's queries and keys (and what feeds them: the tower), not its values
    look_loss(model, batch, normed[0], layer).backward()
    attn = model.encoder.layers[layer].self_attn
    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0
    assert attn.v_proj.weight.grad is None and attn.o_proj.weight.grad is None
    assert model.encoder.layers[0].self_attn.v_proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vision.parameters())
    model.zero_grad(set_to_none=True)
    without = make_batch(examples[:1], 8, 100, VLM_EOS_ID, torch.Generator().manual_seed(0))
    without.looks = []
    assert joint_loss(model, without, 1.0, vision, look_weight=1.0, look_layer=layer).looks is None


def test_a_noisy_look_is_the_masked_slot_of_its_own_answer_not_an_earlier_blocks_filler():
    """With a block longer than the gap between two answers, the first answer's last block (filled with EOS
    after it) reaches the second answer's positions too; a look there queries only the second answer's slot."""
    from nld_trt.training.objective import MaskSchedule

    tokens = list(range(200, 240))  # a first answer at 5..9, a second at 12..19 with a look at position 14
    ex = Example(tokens, [(5, 10), (12, 20)], looks=[(14, [1, 2])])
    aligned = MaskSchedule(p_full=1.0, p_aligned=1.0)
    batch = make_batch([ex], 16, 100, VLM_EOS_ID, torch.Generator().manual_seed(0), aligned)
    at14 = [j for j in range(batch.tokens.shape[1]) if batch.kind[0, j] == NOISY and batch.positions[0, j] == 14]
    assert [int(batch.dlm_targets[0, j]) for j in at14] == [VLM_EOS_ID, tokens[14]]  # the filler, the answer's
    assert batch.looks == [(0, 13, [1, 2]), (0, at14[1], [1, 2])]
