"""Images through a real deployment: `nld-trt serve` of a random tiny vision-language checkpoint (a real
tritonserver plus the OpenAI front end, one for this module), against in-process generation of the same
checkpoint.

Triton: TensorRT-LLM's `image_url_input` (data URLs) and `image_bytes_input` (RGB pixels with
`image_sizes_input`) beside `text_input`, and image parts inside `messages`, over gRPC streaming, unary gRPC,
HTTP generate and generate_stream, in every mode, give the in-process tokens; 20 concurrent image and text
requests give their sequential results. OpenAI: the `openai` SDK with `image_url` data URLs (PNG, JPEG, WebP,
GIF), unary and streaming, `n` > 1, every mode; an allow-listed http(s) image is fetched (loopback server) with
its size cap, timeout and redirect rule; bad image requests get a 400 naming the part and the server answers a
good request after each.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from openai_stack import require_stack, start_stack
from PIL import Image

require_stack()

import httpx  # noqa: E402
import openai  # noqa: E402

from nld_trt.serving.client import ClientError, GrpcClient, Result, http_generate, http_generate_stream  # noqa: E402
from nld_trt.serving.package import ServingOptions, package_repository  # noqa: E402

MODES = ("ar", "dlm", "linear_spec", "auto")
MAX_IMAGES, MAX_IMAGE_BYTES, MAX_PIXELS = 3, 48 * 1024, 1024 * 1024
TOKENS = 10


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


A, B, C = picture(90, 60, 1), picture(40, 70, 2), picture(29, 29, 3)
URL_A, URL_B, URL_C = (data_url(encoded(x)) for x in (A, B, C))


def image_part(url: str, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def turn(*parts) -> list[dict]:
    """One user turn: strings are text parts, the rest image parts as given."""
    return [{"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}]


# the deployment ---------------------------------------------------------------------------------------
class Pictures(http.server.BaseHTTPRequestHandler):
    """A loopback web server with pictures: /a.png, a large one, a slow one, a 404, redirects."""

    port = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/a.png":
            return self._send(encoded(A))
        if self.path == "/large.png":
            return self._send(encoded(picture(200, 200, 9)))  # about 120 KB: over the 48 KiB cap
        if self.path == "/slow.png":
            time.sleep(3)
            return self._send(encoded(A))
        if self.path.startswith("/redirect-"):
            host = {"/redirect-ok": "127.0.0.1", "/redirect-away": "localhost"}[self.path]
            self.send_response(302)
            self.send_header("Location", f"http://{host}:{self.port}/a.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return None

    def _send(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def pictures():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pictures)
    Pictures.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{Pictures.port}"
    server.shutdown()


@pytest.fixture(scope="module")
def stack(tiny_vlm_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    options = ServingOptions(max_batch=16, max_seq_len=512, max_tokens_cap=64, torch_threads=1,
                             max_images_per_request=MAX_IMAGES, max_image_bytes=MAX_IMAGE_BYTES,
                             max_image_pixels=MAX_PIXELS)
    repo = package_repository(tiny_vlm_dir, directory / "repo", options)
    s = start_stack(repo, directory, extra=("--allowed-media-domains", "127.0.0.1", "--media-fetch-timeout", "1.5"))
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def grpc(stack):
    with GrpcClient(stack.grpc_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def reference(vlm, messages, mode, max_tokens=TOKENS, **params):
    return vlm.generate(messages, mode=mode, max_new_tokens=max_tokens, block_length=8, **params)


# Triton -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_every_image_input_and_entry_point_gives_the_in_process_tokens(tiny_vlm, stack, grpc, mode):
    want = reference(tiny_vlm, turn(image_part(URL_A), "What is in the picture?"), mode)
    common = dict(mode=mode, max_tokens=TOKENS, block_length=8)
    text = dict(text_input="What is in the picture?", **common)
    pixels = np.asarray(A)[None]  # [images, height, width, 3], as TensorRT-LLM's Pixtral client sends them
    results = {
        "grpc stream, image_url_input": grpc.generate(image_url_input=[URL_A], **text),
        "grpc stream, image_bytes_input": grpc.generate(image_bytes_input=pixels, **text),
        "grpc stream, messages": grpc.generate(messages=json.dumps(turn(image_part(URL_A), "What is in the picture?")),
                                               **common),
        "grpc unary (nld_sync)": grpc.infer(image_url_input=[URL_A], **text),
        "http generate (nld_sync)": http_generate(f"127.0.0.1:{stack.http_port}", image_url_input=[URL_A], **text),
    }
    chunks = list(http_generate_stream(f"127.0.0.1:{stack.http_port}", image_url_input=[URL_A], **text))
    results["http generate_stream"] = Result.join(chunks)
    for name, r in results.items():
        assert r.token_ids == want.token_ids and r.text == want.text, name
        assert r.stats["prompt_tokens"] == len(want.prompt_token_ids), name  # the image's positions counted


def test_markers_place_the_images_and_padded_pixels_are_cropped_by_their_sizes(tiny_vlm, grpc):
    want = reference(tiny_vlm, turn("Compare ", image_part(URL_B), " with ", image_part(URL_C), "."), "linear_spec")
    by_url = grpc.generate(text_input="Compare <|image_start|> with <|image_start|>.", image_url_input=[URL_B, URL_C],
                           mode="linear_spec", max_tokens=TOKENS, block_length=8)
    padded = np.zeros((2, 70, 40, 3), dtype=np.uint8)  # TensorRT-LLM pads every image to the largest
    padded[0, :70, :40], padded[1, :29, :29] = np.asarray(B), np.asarray(C)
    by_pixels = grpc.generate(text_input="Compare <|image_start|> with <|image_start|>.", image_bytes_input=padded,
                              image_sizes_input=[[70, 40], [29, 29]], mode="linear_spec", max_tokens=TOKENS,
                              block_length=8)
    assert by_url.token_ids == by_pixels.token_ids == want.token_ids
    first = reference(tiny_vlm, turn(image_part(URL_B), image_part(URL_C), "Compare them."), "ar")
    assert grpc.generate(text_input="Compare them.", image_url_input=[URL_B, URL_C], mode="ar",
                         max_tokens=TOKENS).token_ids == first.token_ids  # no marker: the images come first


def test_twenty_concurrent_image_and_text_requests_get_their_sequential_results(tiny_vlm, grpc):
    images = [URL_A, URL_B, URL_C, data_url(encoded(picture(120, 50, 4))), data_url(encoded(picture(33, 90, 5)))]
    jobs = []
    for i in range(20):
        mode = MODES[i % 4]
        if i % 2 == 0:
            jobs.append((turn(image_part(images[i // 2 % 5]), f"Question {i}: what is it?"), mode, 6 + i % 7))
        else:
            jobs.append((f"A plain question number {i}.", mode, 6 + i % 7))
    want = [reference(tiny_vlm, m, mode, n).token_ids for m, mode, n in jobs]

    def served(job):
        m, mode, n = job
        prompt = dict(messages=json.dumps(m)) if isinstance(m, list) else dict(text_input=m)
        return grpc.generate(mode=mode, max_tokens=n, block_length=8, **prompt).token_ids

    with ThreadPoolExecutor(20) as pool:
        got = list(pool.map(served, jobs))
    assert got == want


@pytest.mark.parametrize("fields, message", [
    (dict(image_url_input=["http://127.0.0.1/a.png"]), "image_url_input[0]: the model fetches no URL"),
    (dict(image_url_input=["/etc/passwd"]), "image_url_input[0]: send the image inline as a data URL"),
    (dict(image_url_input=[URL_A] * (MAX_IMAGES + 1)), f"image_url_input[{MAX_IMAGES}]: more than {MAX_IMAGES} images"),
    (dict(image_url_input=[URL_A], image_bytes_input=np.zeros((1, 4, 4, 3), np.uint8)), "not both"),
    (dict(image_bytes_input=np.zeros((1, 4, 4, 2), np.uint8)), "image_bytes_input[0]: image pixels must be uint8"),
    (dict(image_bytes_input=np.zeros((1, 8, 8, 3), np.uint8), image_sizes_input=[[9, 8]]), "outside the padded image"),
    (dict(text_input="<|image_start|> and <|image_start|>", image_url_input=[URL_A]), "2 image markers"),
    (dict(image_url_input=["data:image/png;base64,AAAA"]), "image_url_input[0]: not an image"),
])
def test_bad_triton_image_requests_are_named_and_the_model_serves_on(tiny_vlm, grpc, fields, message):
    request = {"text_input": "What is it?", "max_tokens": 4, **fields}
    with pytest.raises(ClientError, match=message.replace("[", r"\[").replace("]", r"\]")):
        grpc.generate(**request)
    assert grpc.generate(text_input="hi", max_tokens=2).stats["tokens"] >= 1


def test_the_unary_models_answer_a_bad_image_with_its_error_too(stack, grpc):
    bad = dict(text_input="What is it?", image_url_input=[data_url(b"not a picture")], max_tokens=4)
    with pytest.raises(ClientError, match=r"image_url_input\[0\]: not an image"):
        http_generate(f"127.0.0.1:{stack.http_port}", **bad)  # nld_sync: the worker's error is its one response
    with pytest.raises(ClientError, match=r"image_url_input\[0\]: not an image"):
        grpc.infer(**bad)
    assert grpc.infer(text_input="hi", image_url_input=[URL_C], max_tokens=2).stats["tokens"] >= 1


# OpenAI -----------------------------------------------------------------------------------------------
FORMATS = [("PNG", "image/png", {}), ("JPEG", "image/jpeg", {"quality": 90}), ("WEBP", "image/webp", {}),
           ("GIF", "image/gif", {})]


@pytest.mark.parametrize("mode", MODES)
def test_the_openai_sdk_with_image_url_parts_gives_the_in_process_tokens(tiny_vlm, client, mode):
    fmt, media, save = FORMATS[MODES.index(mode)]
    url = data_url(encoded(A, fmt, **save), media)
    messages = turn("Describe", image_part(url, detail="low"), "briefly.")
    want = reference(tiny_vlm, messages, mode)
    r = client.chat.completions.create(model="nld", messages=messages, max_tokens=TOKENS,
                                       extra_body={"mode": mode, "block_length": 8})
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == len(want.token_ids)
    stream = client.chat.completions.create(model="nld", messages=messages, max_tokens=TOKENS, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"mode": mode, "block_length": 8})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.prompt_tokens == len(want.prompt_token_ids)
    # n > 1, sampled: sequence i samples with seed + i, as a batch of the same prompt does in-process
    many = reference(tiny_vlm, [messages] * 3, mode, temperature=0.8, seed=11)
    r = client.chat.completions.create(model="nld", messages=messages, max_tokens=TOKENS, n=3, temperature=0.8,
                                       seed=11, extra_body={"mode": mode, "block_length": 8})
    assert [c.message.content for c in sorted(r.choices, key=lambda c: c.index)] == [m.text for m in many]


def test_a_multi_turn_conversation_keeps_its_images(tiny_vlm, client):
    first = turn(image_part(URL_A), "What is it?")
    answer = reference(tiny_vlm, first, "ar").text
    messages = first + [{"role": "assistant", "content": answer}] + turn(image_part(URL_B), "And this one?")
    want = reference(tiny_vlm, messages, "ar")
    r = client.chat.completions.create(model="nld", messages=messages, max_tokens=TOKENS, extra_body={"block_length": 8})
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == len(want.prompt_token_ids)


def test_an_allowed_http_image_is_fetched_and_sent_inline(tiny_vlm, client, pictures):
    want = reference(tiny_vlm, turn(image_part(URL_A), "What is it?"), "ar").text
    for path in ("/a.png", "/redirect-ok"):  # a redirect to a host on the list is followed
        r = client.chat.completions.create(model="nld", messages=turn(image_part(pictures + path), "What is it?"),
                                           max_tokens=TOKENS, extra_body={"block_length": 8})
        assert r.choices[0].message.content == want, path


def test_tokenize_refuses_images_naming_the_part(stack):
    r = httpx.post(f"{stack.base_url}/tokenize", json={"messages": turn("hi", image_part(URL_A))}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[1]"
    assert "counts text only" in r.json()["error"]["message"]


def bad_cases(pictures: str) -> list[tuple[list[dict], str, str]]:
    truncated = encoded(A)[:200]
    return [
        (turn("x", image_part("data:image/png;base64,@@@@")), "messages[0].content[1]", "not valid base64"),
        (turn("x", image_part(data_url(b"just some text"))), "messages[0].content[1]", "not an image"),
        (turn("x", image_part(data_url(truncated))), "messages[0].content[1]", "truncated or corrupted"),
        (turn(image_part("data:image/png;base64,")), "messages[0].content[0]", "empty"),
        (turn(image_part(data_url(encoded(picture(200, 200, 9))))), "messages[0].content[0]",
         f"over this deployment's limit of {MAX_IMAGE_BYTES} bytes"),
        (turn(image_part(data_url(encoded(Image.new("RGB", (1500, 1000), "red"))))), "messages[0].content[0]",
         f"over the limit of {MAX_PIXELS} pixels"),
        (turn(image_part(data_url(encoded(Image.new("RGB", (1000, 1000), "red"))))), "messages[0].content[0]",
         "KV-cache positions"),  # 1,297 positions for a 512-position deployment
        (turn(image_part(data_url(b"GIF89a", "text/plain"))), "messages[0].content[0]", "not an image/* type"),
        (turn("x", *[image_part(URL_C)] * (MAX_IMAGES + 1)), f"messages[0].content[{MAX_IMAGES + 1}]",
         f"more than {MAX_IMAGES} images"),
        (turn(image_part("file:///etc/passwd")), "messages[0].content[0]", "never reads local files"),
        (turn(image_part("http://localhost:9/a.png")), "messages[0].content[0]", "'localhost' is not one this server"),
        (turn(image_part(pictures + "/redirect-away")), "messages[0].content[0]", "'localhost' is not one this server"),
        (turn(image_part(pictures + "/large.png")), "messages[0].content[0]", f"limit of {MAX_IMAGE_BYTES} bytes"),
        (turn(image_part(pictures + "/slow.png")), "messages[0].content[0]", "took longer than 1.5 s"),
        (turn(image_part(pictures + "/missing.png")), "messages[0].content[0]", "answered HTTP 404"),
        (turn(image_part(URL_C, detail="ultra")), "messages[0].content[0]", "detail must be auto, low or high"),
        (turn({"type": "image_url", "image_url": {}}), "messages[0].content[0]", "needs"),
        ([{"role": "system", "content": [image_part(URL_C)]}] + turn("hi"), "messages[0].content[0]",
         "images go in user messages only"),
        (turn({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}), "messages[0].content[0]",
         "are not supported"),
    ]


def test_bad_image_requests_get_a_400_naming_the_part_and_the_server_answers_after_each(client, pictures):
    cases = bad_cases(pictures)
    assert len(cases) >= 15
    for messages, param, fragment in cases:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                r = client.chat.completions.create(model="nld", messages=messages, max_tokens=4, stream=stream)
                list(r) if stream else None
            body = e.value.body
            assert body["param"] == param and fragment in body["message"], (fragment, body)
            assert body["type"] == "invalid_request_error"
            good = client.chat.completions.create(model="nld", messages=turn(image_part(URL_C), "hi"), max_tokens=2)
            assert good.usage.completion_tokens >= 1


def test_a_front_end_without_an_allow_list_fetches_nothing(stack, pictures):
    from nld_trt.serving.openai.frontend import FrontEnd

    with FrontEnd(stack.grpc_url, port=0) as front:
        c = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="nld", messages=turn(image_part(pictures + "/a.png")), max_tokens=2)
        assert e.value.body["param"] == "messages[0].content[0]"
        assert "started without --allowed-media-domains" in e.value.body["message"]
        assert c.chat.completions.create(model="nld", messages=turn(image_part(URL_C)), max_tokens=2).choices


# the chat page ----------------------------------------------------------------------------------------
def drawing(kind: str) -> Image.Image:
    """Pictures a person might attach (the tiny model's weights are random: what it answers is not the point)."""
    from PIL import ImageDraw

    image = Image.new("RGB", (168, 112), "white")
    draw = ImageDraw.Draw(image)
    if kind == "circles":
        for x, colour in ((40, "#d62828"), (110, "#f77f00")):
            draw.ellipse((x - 28, 28, x + 28, 84), fill=colour)
    elif kind == "squares":
        for x in (20, 70, 120):
            draw.rectangle((x, 36, x + 34, 70), fill="#1d70b8")
    else:
        draw.polygon(((84, 14), (20, 98), (148, 98)), fill="#2a9d2a")
    return image


DROP = """
const [b64, name, kind] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, { type: "image/png" }));
const event = kind === "paste"
  ? new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true, cancelable: true })
  : new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true });
document.getElementById(kind === "paste" ? "prompt" : "log").dispatchEvent(event);
"""


def test_a_person_attaches_pastes_and_drops_images_on_the_chat_page(tiny_vlm, stack, tmp_path):
    from page_driver import By, ask, chromium, content, ready, set_field, wait
    from selenium.webdriver.support.ui import Select

    pngs = {kind: encoded(drawing(kind)) for kind in ("circles", "squares", "triangle")}
    (tmp_path / "circles.png").write_bytes(pngs["circles"])
    browser = chromium(1100, 820)
    try:
        ready(browser, stack.base_url)
        Select(browser.find_element(By.ID, "mode")).select_by_value("linear_spec")
        set_field(browser, "block-length", "8")
        set_field(browser, "max-tokens", str(TOKENS))
        attached = lambda: browser.find_elements(By.CSS_SELECTOR, "#attachments img")  # noqa: E731
        browser.find_element(By.ID, "file").send_keys(str(tmp_path / "circles.png"))  # the file picker
        wait(lambda: len(attached()) == 1, what="the picked image's thumbnail")
        browser.execute_script(DROP, base64.b64encode(pngs["squares"]).decode(), "squares.png", "paste")
        wait(lambda: len(attached()) == 2, what="the pasted image's thumbnail")
        first = ask(browser, "How many shapes are there?", 0)
        assert attached() == []  # sent with the message
        question = turn(image_part(data_url(pngs["circles"])), image_part(data_url(pngs["squares"])),
                        "How many shapes are there?")
        want = reference(tiny_vlm, question, "linear_spec")
        assert content(first) == want.text
        user_turn = browser.find_elements(By.CSS_SELECTOR, ".turn.user")[0]
        assert len(user_turn.find_elements(By.CSS_SELECTOR, ".thumbs img")) == 2
        stats = first.find_element(By.CSS_SELECTOR, ".stats").text
        for part in (f"{len(want.token_ids)} tokens", f"{want.stats.nfe} forward passes",
                     f"prompt {len(want.prompt_token_ids)}", "tok/s"):
            assert part in stats, stats

        browser.execute_script(DROP, base64.b64encode(pngs["triangle"]).decode(), "triangle.png", "drop")
        wait(lambda: len(attached()) == 1, what="the dropped image's thumbnail")
        second = ask(browser, "And now?", 1)
        conversation = question + [{"role": "assistant", "content": want.text}] + turn(
            image_part(data_url(pngs["triangle"])), "And now?")
        want2 = reference(tiny_vlm, conversation, "linear_spec")
        assert content(second) == want2.text  # the earlier turn's images went along
        assert f"prompt {len(want2.prompt_token_ids)}" in second.find_element(By.CSS_SELECTOR, ".stats").text
        shot = tmp_path / "openai-chat-page-images.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"\nscreenshot of the chat page with images: {shot}")
    finally:
        browser.quit()


def test_nld_trt_client_sends_image_files(tiny_vlm, stack, tmp_path):
    from click.testing import CliRunner

    from nld_trt.serving.cli import client_command

    (tmp_path / "b.png").write_bytes(encoded(B))
    (tmp_path / "c.jpg").write_bytes(encoded(C, "JPEG"))
    want = reference(tiny_vlm, turn(image_part(URL_B), image_part(data_url(encoded(C, "JPEG"), "image/jpeg")),
                                    "Compare them."), "ar")
    result = CliRunner().invoke(client_command, ["--url", stack.grpc_url, "--image", str(tmp_path / "b.png"),
                                                 "--image", str(tmp_path / "c.jpg"), "--max-tokens", str(TOKENS),
                                                 "--block-length", "8", "--json", "Compare them."])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["token_ids"] == want.token_ids
