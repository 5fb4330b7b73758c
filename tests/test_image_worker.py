"""The serving scheduler's image worker, without Triton: a request with images is decoded, prepared and
encoded off the decoding thread and joins the batch only when its image rows are ready; the batch keeps stepping
meanwhile; the tokens are those of in-process generation; a client that leaves while its images are prepared is
completed as cancelled; stopping answers what is still being prepared. Also the protocol's image byte caps."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest

from nld_trt.errors import GenerationError
from nld_trt.serving.backend import Scheduler
from nld_trt.serving.protocol import Limits, gather, prepare
from test_serving_protocol import ListSink

LIMITS = Limits(max_tokens_cap=64, default_max_tokens=8, streaming=True)


def data_url(width: int, height: int, seed: int) -> str:
    import base64
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


URL_A, URL_B = data_url(90, 60, 1), data_url(40, 70, 2)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def turn(*parts) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}]


def image_request(vlm, url: str = URL_A, **params):
    return prepare(vlm, gather({}, {"messages": json.dumps(turn(image_part(url), "What is it?")), "max_tokens": 8,
                                    **params}), LIMITS, defer_images=True)


def gated(prepared):
    """The request with its image preparation held until `gate` is set (`started` once the worker is on it)."""
    gate, started = threading.Event(), threading.Event()
    inner = prepared.deferred

    def deferred():
        started.set()
        assert gate.wait(60)
        return inner()

    return replace(prepared, deferred=deferred), gate, started


@pytest.mark.parametrize("workers", [1, 0])
def test_image_requests_get_the_in_process_tokens_with_and_without_the_worker(tiny_vlm, workers):
    want = [tiny_vlm.generate(turn(image_part(u), "What is it?"), mode=m, max_new_tokens=8, block_length=8).token_ids
            for u, m in ((URL_A, "ar"), (URL_B, "linear_spec"))]
    scheduler = Scheduler(tiny_vlm, image_workers=workers)
    try:
        sinks = [ListSink(), ListSink()]
        for (url, mode), sink in zip(((URL_A, "ar"), (URL_B, "linear_spec")), sinks):
            scheduler.submit(image_request(tiny_vlm, url, mode=mode, block_length=8, stream=True), sink)
        assert all(s.done.wait(60) for s in sinks)
    finally:
        scheduler.stop()
    assert [s.ids() for s in sinks] == want and not any(s.errors for s in sinks)


def test_the_batch_steps_while_a_request_waits_for_its_images(tiny_vlm):
    scheduler = Scheduler(tiny_vlm, image_workers=1)
    try:
        held, gate, started = gated(image_request(tiny_vlm))
        image, text = ListSink(), ListSink()
        scheduler.submit(held, image)
        assert started.wait(30)
        scheduler.submit(prepare(tiny_vlm, gather({}, {"text_input": "A plain question.", "max_tokens": 12,
                                                       "stream": True}), LIMITS), text)
        assert text.done.wait(60)  # the text request ran to its end while the image request was held
        assert not image.done.is_set() and scheduler.preparing == 1 and len(text.updates) > 1
        gate.set()
        assert image.done.wait(60) and not image.errors
    finally:
        scheduler.stop()
    want = tiny_vlm.generate(turn(image_part(URL_A), "What is it?"), max_new_tokens=8)
    assert image.ids() == want.token_ids


def test_a_client_that_leaves_while_its_images_are_prepared_is_never_admitted(tiny_vlm):
    queries = tiny_vlm.pages.stats.queries
    scheduler = Scheduler(tiny_vlm, image_workers=1)
    try:
        held, gate, started = gated(image_request(tiny_vlm))
        sink = ListSink()
        scheduler.submit(held, sink)
        assert started.wait(30)
        sink.gone = True
        gate.set()
        assert sink.done.wait(30) and sink.updates == [] and sink.errors == []
        assert scheduler.cancelled_total == 1 and scheduler.preparing == 0
    finally:
        scheduler.stop()
    tiny_vlm.pages.check()
    assert tiny_vlm.pages.in_use == 0 and tiny_vlm.pages.stats.queries == queries  # no prefix lookup: never admitted


def test_stopping_answers_the_requests_still_being_prepared(tiny_vlm):
    scheduler = Scheduler(tiny_vlm, image_workers=1)
    running, gate, started = gated(image_request(tiny_vlm))
    queued, *_ = gated(image_request(tiny_vlm, URL_B))
    first, second = ListSink(), ListSink()
    scheduler.submit(running, first)
    assert started.wait(30)
    scheduler.submit(queued, second)  # waits behind the first for the worker
    threading.Timer(0.5, gate.set).start()
    scheduler.stop()
    assert first.done.is_set() and second.done.is_set()
    assert second.errors == ["the model is being unloaded"]
    assert first.errors == ["the model is being unloaded"] or first.updates  # it finished preparing before the end


def test_image_data_counts_toward_its_own_cap_not_the_prompt_bytes(tiny_vlm):
    limits = Limits(max_tokens_cap=64, default_max_tokens=8, streaming=True, max_prompt_bytes=1024,
                    max_image_bytes=64 * 1024)
    big = "data:image/png;base64," + "A" * 4000  # beyond the 1 KiB text cap, inside the image cap
    p = prepare(tiny_vlm, gather({}, {"messages": json.dumps(turn(image_part(big), "hi"))}), limits, defer_images=True)
    assert p.deferred is not None  # accepted as far as cheap checks go (its base64 is checked when it is decoded)
    with pytest.raises(GenerationError, match="messages holds .* bytes of text, over this deployment's cap of 1024"):
        prepare(tiny_vlm, gather({}, {"messages": json.dumps(turn(image_part(URL_A), "x" * 2000))}), limits)
    with pytest.raises(GenerationError, match=r"messages\[0\].content\[0\]: the image is over this deployment's limit"):
        prepare(tiny_vlm, gather({}, {"messages": json.dumps(turn(image_part("data:image/png;base64," + "A" * 90000)))}),
                limits)
    with pytest.raises(GenerationError, match="text_input is 2000 bytes, over this deployment's cap of 1024"):
        prepare(tiny_vlm, gather({}, {"text_input": "x" * 2000, "image_url_input": [URL_A]}), limits)
