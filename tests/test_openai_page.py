"""The web chat page at `/`, driven in a real headless Chromium (Debian's chromium + chromium-driver, through
selenium) against a real deployment (`nld-trt serve` of the embedded model).

A person types a question, sees the answer stream in and the stats appear under it, switches the decoding
mode and asks a follow-up about that answer in the same conversation, and can stop an answer (which frees its
KV slot). The answers must be the in-process greedy tokens of the same conversation, and both must carry the
right number (the follow-up can only be answered from the first turn). A screenshot is saved and its path
printed (run with -s to see it).
"""

from __future__ import annotations

import time

import pytest
from openai_stack import package_embedded, require_stack, start_stack

require_stack()

from page_driver import By, Keys, answers, ask, chromium, content, set_field, wait  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

import nld_trt  # noqa: E402
from nld_trt.evaluate import extract_answer, load_task  # noqa: E402
from nld_trt.serving.client import GrpcClient  # noqa: E402

# The first evaluation question, then its follow-up from the conversation set (asked after the solved question)
FIRST, FOLLOWUP = (next(p for p in load_task("gsm_synth_chat") if p.index == 0 and p.group == g)
                   for g in ("turn 1", "followup"))
QUESTIONS = [FIRST.question, FOLLOWUP.question]
RAMBLE = "12 12 12 12 12 12 12 12"
# The page has no min_tokens field; the stop test adds one to the page's request (the OpenAI front end takes
# vLLM's `min_tokens`) so the stream runs until the button stops it: the embedded model may end any prompt with an
# EOS within a few dozen tokens, before the click lands.
FORCE_LONG_ANSWERS = """
const minTokens = arguments[0], pageFetch = window.fetch;
window.fetch = (url, options) => {
  if (String(url).endsWith("/v1/chat/completions") && options && options.body) {
    options = {...options, body: JSON.stringify({...JSON.parse(options.body), min_tokens: minTokens})};
  }
  return pageFetch(url, options);
};
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("openai-page")
    s = start_stack(package_embedded(directory), directory)
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def nld():
    return nld_trt.load(max_batch=4, max_seq_len=1024)


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def test_a_person_chats_sees_streamed_answers_and_stats_and_switches_modes(stack, nld, browser, tmp_path_factory):
    browser.get(stack.base_url)
    wait(lambda: "ready" in browser.find_element(By.ID, "health").text, what="the health badge")
    assert Select(browser.find_element(By.ID, "mode")).first_selected_option.get_attribute("value") == "linear_spec"

    first = ask(browser, QUESTIONS[0], 0)
    want = nld.generate(QUESTIONS[0], mode="linear_spec", max_new_tokens=256)
    assert content(first) == want.text and extract_answer(want.text) == FIRST.gold
    assert int(first.get_attribute("data-chunks")) > 1  # the answer arrived in several streamed events
    assert first.find_element(By.CSS_SELECTOR, ".label").text == "linear_spec · T=0"
    stats = first.find_element(By.CSS_SELECTOR, ".stats").text
    for part in (f"{len(want.token_ids)} tokens", f"{want.stats.nfe} forward passes", f"TPF {want.stats.tpf:.2f}",
                 "tok/s", f"prompt {len(want.prompt_token_ids)}", "finish stop"):
        assert part in stats, stats

    Select(browser.find_element(By.ID, "mode")).select_by_value("dlm")
    set_field(browser, "block-length", "8")
    second = ask(browser, QUESTIONS[1], 1)
    conversation = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": want.text},
                    {"role": "user", "content": QUESTIONS[1]}]
    want2 = nld.generate(nld.tokenizer.encode_chat(conversation), mode="dlm", block_length=8, max_new_tokens=256)
    assert content(second) == want2.text  # the page sent the whole conversation, in the new mode
    assert extract_answer(want2.text) == FOLLOWUP.gold, want2.text  # answered from the first turn
    assert second.find_element(By.CSS_SELECTOR, ".label").text == "dlm · B=8 · T=0"
    assert f"{want2.stats.nfe} forward passes" in second.find_element(By.CSS_SELECTOR, ".stats").text

    shots = tmp_path_factory.mktemp("screenshots")
    assert browser.save_screenshot(str(shots / "openai-chat-page.png"))

    # thinking on, with a budget: the reasoning shows apart from the answer, as the model split them
    browser.find_element(By.ID, "thinking").click()
    set_field(browser, "think-budget", "8")
    Select(browser.find_element(By.ID, "mode")).select_by_value("linear_spec")
    set_field(browser, "block-length", "")
    browser.find_element(By.ID, "reset").click()
    third = ask(browser, QUESTIONS[0], 0)
    end_think = nld.tokenizer.token_id("[/THINK]")
    want3 = nld.generate(QUESTIONS[0], mode="linear_spec", max_new_tokens=256, max_thinking_tokens=8,
                         end_think_token_id=end_think, template_kwargs={"enable_thinking": True})
    cut = want3.token_ids.index(end_think)
    reasoning = third.find_element(By.CSS_SELECTOR, "details.reasoning div").get_attribute("textContent")
    assert reasoning == nld.tokenizer.decode(want3.token_ids[:cut])
    assert content(third) == nld.tokenizer.decode(want3.token_ids[cut + 1:])
    assert third.find_element(By.CSS_SELECTOR, ".label").text == "linear_spec · T=0 · think ≤8"

    shot = shots / "openai-chat-page-thinking.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"\nscreenshots of the chat page: {shots / 'openai-chat-page.png'}, {shot}")


def test_the_stop_button_ends_the_stream_and_frees_its_kv_slot(stack, browser):
    grpc = GrpcClient(stack.grpc_url, timeout=60)
    before = grpc.generate(text_input="hi", max_tokens=1).stats["cancelled_total"]
    browser.get(stack.base_url)
    wait(lambda: "ready" in browser.find_element(By.ID, "health").text, what="the health badge")
    Select(browser.find_element(By.ID, "mode")).select_by_value("ar")
    set_field(browser, "max-tokens", "400")
    browser.execute_script(FORCE_LONG_ANSWERS, 400)
    box = browser.find_element(By.ID, "prompt")
    box.send_keys(RAMBLE)
    box.send_keys(Keys.ENTER)
    turn = wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".turn.assistant"), what="the answer")[0]
    wait(lambda: content(turn), what="the first streamed tokens")
    browser.find_element(By.ID, "stop").click()
    wait(lambda: answers(browser), what="the stopped answer")
    assert "stopped by you" in turn.find_element(By.CSS_SELECTOR, ".stats").text
    deadline = time.monotonic() + 30
    while (stats := grpc.generate(text_input="hi", max_tokens=1).stats)["cancelled_total"] != before + 1:
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    assert stats["slots_in_use"] == 0 and stack.metric("nld_kv_slots_in_use") == 0
    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".turn") == []
