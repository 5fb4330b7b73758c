"""One prompt encoder for the Python API and the serving protocol: the same ids, checks and thinking lookup,
image spans in the shape prefix caching keys on, and no local files for served requests."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from nld_trt.errors import GenerationError
from nld_trt.prompt import ImageSpan, thinking_tokens
from nld_trt.serving.protocol import Limits, prepare
from nld_trt.tiny import END_THINK_ID, IMAGE_PAD_ID, THINK_ID

LIMITS = Limits(max_tokens_cap=64, default_max_tokens=8, streaming=True, max_prompt_bytes=1 << 20)


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))


@pytest.mark.parametrize("think", [False, True])
def test_the_api_and_the_protocol_encode_text_the_same(tiny, tiny_vlm, think):
    for nld in (tiny, tiny_vlm):
        kwargs = {"enable_thinking": think}
        api = nld.generate("Tom has 3 apples.", template_kwargs=kwargs, max_new_tokens=2)
        served = prepare(nld, {"text_input": "Tom has 3 apples.", "chat_template_kwargs": json.dumps(kwargs)}, LIMITS)
        assert served.prompt_ids == api.prompt_token_ids
        assert served.thinking is think  # [THINK] (text release layout) or <think> + newline (ChatML)
        messages = [{"role": "user", "content": "Tom has 3 apples."}]
        assert prepare(nld, {"messages": json.dumps(messages), "chat_template_kwargs": json.dumps(kwargs)},
                       LIMITS).prompt_ids == api.prompt_token_ids


def test_thinking_tokens_are_looked_up_by_name(tiny, tiny_vlm):
    assert thinking_tokens(tiny.tokenizer) == (THINK_ID, END_THINK_ID)  # [THINK] / [/THINK]
    assert thinking_tokens(tiny_vlm.tokenizer) == (tiny_vlm.tokenizer.token_id("<think>"),
                                                   tiny_vlm.tokenizer.token_id("</think>"))
    served = prepare(tiny_vlm, {"text_input": "hi", "max_thinking_tokens": 3}, LIMITS)
    assert served.params.end_think_token_id == tiny_vlm.tokenizer.token_id("</think>")


def test_a_served_request_sends_images_inline_and_gets_spans(tiny_vlm, tmp_path):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                                             {"type": "text", "text": "What is it?"}]}]
    served = prepare(tiny_vlm, {"messages": json.dumps(messages)}, LIMITS)
    api = tiny_vlm.generate([{"role": "user", "content": [{"type": "image", "image": IMAGE},
                                                          {"type": "text", "text": "What is it?"}]}], max_new_tokens=2)
    assert served.prompt_ids == api.prompt_token_ids
    (span,) = served.prompt.images
    assert isinstance(span, ImageSpan) and served.prompt.spans == [(span.start, span.end, span.digest)]
    assert span.digest == api.images[0]["digest"] and (span.start, span.end) == (api.images[0]["start"], api.images[0]["end"])
    pads = span.pad_positions()
    assert all(served.prompt_ids[p] == IMAGE_PAD_ID for p in pads) and len(pads) == span.grid[0] * span.grid[1]
    IMAGE.save(tmp_path / "x.png")
    for part in ({"type": "image", "image": str(tmp_path / "x.png")}, {"type": "image", "path": str(tmp_path / "x.png")},
                 {"type": "image_url", "image_url": {"url": f"file://{tmp_path / 'x.png'}"}}):
        with pytest.raises(GenerationError, match="cannot name a local file"):
            prepare(tiny_vlm, {"messages": json.dumps([{"role": "user", "content": [part]}])}, LIMITS)


def test_the_protocol_refuses_images_for_a_text_model(tiny):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]}]
    with pytest.raises(GenerationError, match="is a text-only model: it cannot take images"):
        prepare(tiny, {"messages": json.dumps(messages)}, LIMITS)


def test_image_spans_do_not_depend_on_where_the_image_comes_from(tiny_vlm):
    a = tiny_vlm.prompts.encode([{"role": "user", "content": [{"type": "image", "image": IMAGE}]}], local_files=False)
    b = tiny_vlm.prompts.encode([{"role": "user", "content": [{"type": "image_url", "image_url": data_url(IMAGE)}]}],
                                local_files=False)
    assert a.ids == b.ids and a.spans == b.spans
    other = IMAGE.transpose(Image.FLIP_LEFT_RIGHT)
    c = tiny_vlm.prompts.encode([{"role": "user", "content": [{"type": "image", "image": other}]}], local_files=False)
    assert c.ids == a.ids and c.spans != a.spans  # same tokens, other content: the digest tells them apart
