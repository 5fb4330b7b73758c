"""The `nld_tokenizer` model's requests (nld_trt/serving/tokenize.py), without Triton: what the OpenAI front end's
/tokenize, /detokenize and /tokenizer_info ask it, and its refusals. (Over a real server: tests/test_openai_api.py.)"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from nld_trt.errors import GenerationError
from nld_trt.runtime import default_model_path
from nld_trt.serving.tokenize import handle
from nld_trt.tokenizer import NLDTokenizer

TOK = NLDTokenizer(default_model_path())


def ask(wanted=None, parameters=None, **inputs):
    arrays = {k: np.array([v if isinstance(v, list) else [v]], dtype=np.int32 if k == "input_ids" else object)
              for k, v in inputs.items()}
    return handle(TOK, arrays, parameters, 65536, 1024, wanted)


def test_text_messages_ids_and_info():
    assert ask(text_input=b"Tom has 3 apples.")["token_ids"] == TOK.encode("Tom has 3 apples.")
    out = ask(parameters={"add_special_tokens": False, "return_token_strs": True}, text_input=b"Tom has")
    assert out["token_ids"] == TOK.encode("Tom has", add_special_tokens=False)
    assert out["token_strs"] == [TOK.token_text(t) for t in out["token_ids"]]
    messages = [{"role": "user", "content": "hi"}]
    assert ask(messages=json.dumps(messages).encode())["token_ids"] == TOK.encode_chat(messages)
    assert ask(input_ids=[5, 6, 7])["text_output"] == TOK.decode([5, 6, 7], skip_special_tokens=False)
    info = json.loads(ask(add_special_tokens=False)["tokenizer_info"])
    assert info["eos_token"] == TOK.special_token("eos_token") and info["chat_template"] == TOK.chat_template
    assert set(ask({"token_ids"}, text_input=b"hi")) == {"token_ids"}  # only what is asked for is built


def test_the_tokenizer_model_imports_no_pytorch():
    import subprocess

    code = "import sys, nld_trt.serving.tokenize; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.parametrize("inputs, message", [
    (dict(input_ids=[10**6]), rf"input_ids must be token ids in \[0, {TOK.vocab_size}\), got 1000000"),
    (dict(text_input=b"hi", input_ids=[1]), "send one of text_input, messages and input_ids"),
    (dict(messages=b"[1]"), "messages must be a non-empty JSON list"),
    (dict(text_input=b"x" * 70000), "text_input is 70000 bytes, over this deployment's cap of 65536"),
    (dict(messages=json.dumps([{"role": "user", "content": [{"type": "text", "text": "hi"}, {
        "type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]).encode()),
     r"messages\[0\].content\[1\]: the tokenizer model counts text only"),
])
def test_bad_requests_are_named(inputs, message):
    with pytest.raises(GenerationError, match=message):
        ask(**inputs)
