"""Decoding with images: greedy ar equals transformers' Mistral3ForConditionalGeneration on the same weights
(full recompute), linear_spec and auto equal ar, dlm follows the spec's rule, mixed batches equal single runs,
and images are encoded once per content."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Mistral3ForConditionalGeneration

from nld_trt import load
from nld_trt.checkpoint import load_vision_weights, load_weights
from nld_trt.errors import GenerationError
from nld_trt.tiny import IMAGE_BREAK_ID, IMAGE_END_ID, IMAGE_PAD_ID, IMAGE_START_ID
from nld_trt.vision.config import VLMConfig
from nld_trt.vision.tower import build_vision_encoder

from test_dlm_reference import plain_dlm


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def chat(*parts) -> list[dict]:
    """One user turn: PIL images become image parts, strings text parts."""
    content = [{"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


A, B, C = picture(90, 60, 1), picture(40, 70, 2), picture(29, 29, 3)
PROMPTS = [chat(A, "What is in the picture?"), "A plain question.", chat(B, "Compare", C, "with this."),
           chat("Describe", A)]


def mistral3_oracle(path) -> Mistral3ForConditionalGeneration:
    """transformers' Mistral 3 with the checkpoint's weights: text model as Ministral 3, diffusion_head as its LM
    head, the pad id as its image token."""
    config = VLMConfig.from_file(path)
    model = Mistral3ForConditionalGeneration(config.to_mistral3(image_token_id=IMAGE_PAD_ID)).eval()
    state = {}
    for k, v in load_weights(path, config.text).items():
        state["lm_head.weight" if k == "diffusion_head.weight" else "model.language_model." + k.removeprefix("encoder.")] = v
    for k, v in load_vision_weights(path, config).items():
        state["model." + k.removeprefix("encoder.")] = v
    model.load_state_dict(state, strict=True)
    return model


def test_greedy_ar_with_images_equals_transformers_mistral3(tiny_vlm, tiny_vlm_dir):
    oracle = mistral3_oracle(tiny_vlm_dir)
    for prompt in (PROMPTS[0], PROMPTS[2]):
        ours = tiny_vlm.generate(prompt, mode="ar", max_new_tokens=12, eos_token_ids=())
        encoded = tiny_vlm.prompts.encode(prompt, local_files=False)
        pixels = [img.pixels for img in encoded.pixels]
        h, w = max(p.shape[1] for p in pixels), max(p.shape[2] for p in pixels)
        batch = torch.zeros(len(pixels), 3, h, w)
        for i, p in enumerate(pixels):
            batch[i, :, : p.shape[1], : p.shape[2]] = p
        sizes = torch.tensor([list(p.shape[1:]) for p in pixels])
        ids = list(encoded.ids)
        assert ours.prompt_token_ids == ids
        with torch.no_grad():
            for _ in range(12):  # full recompute, no cache
                logits = oracle(input_ids=torch.tensor([ids]), pixel_values=batch, image_sizes=sizes).logits[0, -1]
                ids.append(int(logits.argmax()))
        assert ours.token_ids == ids[len(encoded.ids):]


def test_the_image_changes_the_answer_and_its_rows_reach_the_model(tiny_vlm):
    with_a = tiny_vlm.generate(chat(A, "What is in the picture?"), mode="ar", max_new_tokens=10, eos_token_ids=())
    with_b = tiny_vlm.generate(chat(B, "What is in the picture?"), mode="ar", max_new_tokens=10, eos_token_ids=())
    assert with_a.token_ids != with_b.token_ids


def test_prompt_token_ids_show_the_expanded_image(tiny_vlm):
    r = tiny_vlm.generate(PROMPTS[2], mode="ar", max_new_tokens=2)
    ids = r.prompt_token_ids
    assert len(r.images) == 2
    for info, img in zip(r.images, (B, C)):
        rows, cols = tiny_vlm.prompts.processor.grid(*img.size)
        assert info["grid"] == [rows, cols] and info["end"] - info["start"] == 1 + rows * (cols + 1)
        span = ids[info["start"]: info["end"]]
        expected = [IMAGE_START_ID] + ([IMAGE_PAD_ID] * cols + [IMAGE_BREAK_ID]) * rows
        expected[-1] = IMAGE_END_ID
        assert span == expected
    assert ids.count(IMAGE_START_ID) == 2 and ids.count(IMAGE_END_ID) == 2


@pytest.mark.parametrize("block_length,lora", [(4, True), (8, False), (32, True)])
def test_linear_spec_and_auto_equal_ar_with_images(tiny_vlm, block_length, lora):
    ar = tiny_vlm.generate(PROMPTS, mode="ar", max_new_tokens=20, eos_token_ids=())
    spec = tiny_vlm.generate(PROMPTS, mode="linear_spec", block_length=block_length, lora=lora, max_new_tokens=20,
                             eos_token_ids=())
    auto = tiny_vlm.generate(PROMPTS, mode="auto", block_length=block_length, max_new_tokens=20, eos_token_ids=())
    for a, s, u in zip(ar, spec, auto):
        assert s.token_ids == a.token_ids and u.token_ids == a.token_ids
        assert s.stats.accepted_per_step and s.stats.draft_passes_per_step  # it did draft and verify


@pytest.fixture(scope="module")
def vlm64(tiny_vlm_dir):
    """float64: the cached and the recomputed passes cannot differ by a rounding tie."""
    return load(tiny_vlm_dir, dtype="float64", max_batch=2, max_seq_len=256)


@pytest.mark.parametrize("threshold,block_length,max_new", [(0.9, 8, 24), (0.0, 8, 16), (0.3, 4, 13)])
def test_dlm_with_images_equals_the_spec_rule(vlm64, tiny_vlm_dir, threshold, block_length, max_new):
    cfg = vlm64.config
    vision = build_vision_encoder(vlm64.vlm, load_vision_weights(tiny_vlm_dir, vlm64.vlm), "cpu", torch.float64)
    for prompt in (PROMPTS[0], PROMPTS[2]):
        got = vlm64.generate(prompt, mode="dlm", threshold=threshold, block_length=block_length, max_new_tokens=max_new)
        encoded = vlm64.prompts.encode(prompt, local_files=False)
        with torch.no_grad():  # the image rows, computed apart from the runtime's encoder and cache
            rows = vision([img.pixels.double() for img in encoded.pixels])
        pads = [p for span in encoded.images for p in span.pad_positions()]

        def embed(tokens):
            x = vlm64.model.embed(tokens).clone()
            x[0, pads] = torch.cat(rows)
            return x

        expected = plain_dlm(vlm64, encoded.ids, block_length, threshold, max_new, set(cfg.eos_token_ids),
                             cfg.dlm_type, cfg.mask_token_id, embed=embed)
        assert got.token_ids == expected


@pytest.mark.parametrize("mode", ["ar", "dlm", "linear_spec"])
def test_mixed_batches_of_image_and_text_requests_equal_their_single_runs(vlm64, mode):
    """Four prompts over two KV slots: requests join and leave while others decode (continuous batching)."""
    batched = vlm64.generate(PROMPTS, mode=mode, max_new_tokens=14, block_length=8, eos_token_ids=())
    for i, (prompt, r) in enumerate(zip(PROMPTS, batched)):
        single = vlm64.generate(prompt, mode=mode, max_new_tokens=14, block_length=8, eos_token_ids=(), seed=i)
        assert single.token_ids == r.token_ids and single.prompt_token_ids == r.prompt_token_ids


def test_a_prefill_in_pieces_splits_the_image_rows_exactly(vlm64):
    whole = vlm64.generate(PROMPTS[2], mode="ar", max_new_tokens=10, eos_token_ids=())
    saved = vlm64.executor.max_prefill_chunk
    try:
        for piece in (5, 7, 16):  # image spans straddle the piece boundaries
            vlm64.executor.max_prefill_chunk = piece
            assert vlm64.generate(PROMPTS[2], mode="ar", max_new_tokens=10, eos_token_ids=()).token_ids == whole.token_ids
    finally:
        vlm64.executor.max_prefill_chunk = saved


def test_a_multi_turn_chat_encodes_the_same_image_once(tiny_vlm_dir):
    """The encoder's cache by content (the prefix cache off: with it on, later turns reuse the image's KV pages and
    need no rows at all, tests/test_prefix_cache_images.py)."""
    nld = load(tiny_vlm_dir, max_batch=2, max_seq_len=512, prefix_cache=False)
    image = picture(64, 48, 9)
    first = nld.generate(chat(image, "What is it?"), mode="ar", max_new_tokens=6)
    turn2 = chat(image, "What is it?") + [{"role": "assistant", "content": first.text},
                                          {"role": "user", "content": "And its colour?"}]
    second = nld.generate(turn2, mode="linear_spec", max_new_tokens=6)
    again = nld.generate(chat(image.copy(), "What is it?"), mode="ar", max_new_tokens=6)
    enc = nld.image_encoder
    assert (enc.encoded_images, enc.misses, enc.hits) == (1, 1, 2)
    assert again.token_ids == first.token_ids  # cached rows give what fresh rows gave
    assert second.images[0]["digest"] == first.images[0]["digest"]
    fresh = load(tiny_vlm_dir, max_batch=2, max_seq_len=512, prefix_cache=False)
    assert fresh.generate(turn2, mode="linear_spec", max_new_tokens=6).token_ids == second.token_ids


def test_image_prefill_chunks_take_the_eager_path_beside_static_passes(tiny_vlm_dir):
    """A prefill piece of a shape the static decode passes serve (the block size) still gets its image rows."""
    eager = load(tiny_vlm_dir, max_batch=2, max_seq_len=256)
    static = load(tiny_vlm_dir, max_batch=2, max_seq_len=256, compile="static")
    for nld in (eager, static):
        nld.executor.max_prefill_chunk = 32
    for mode in ("ar", "linear_spec"):
        a = eager.generate(PROMPTS[0], mode=mode, max_new_tokens=12, eos_token_ids=())
        b = static.generate(PROMPTS[0], mode=mode, max_new_tokens=12, eos_token_ids=())
        assert a.token_ids == b.token_ids
    assert len(a.prompt_token_ids) > 32


def test_images_from_paths_bytes_and_data_urls_give_the_same_tokens(tiny_vlm, tmp_path):
    import base64
    import io

    buf = io.BytesIO()
    A.save(buf, format="PNG")
    data = buf.getvalue()
    (tmp_path / "a.png").write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    parts = [{"type": "image", "image": A}, {"type": "image", "image": data}, {"type": "image", "image": str(tmp_path / "a.png")},
             {"type": "image_url", "image_url": {"url": url}}, {"type": "image", "path": str(tmp_path / "a.png")}]
    outs = [tiny_vlm.generate([{"role": "user", "content": [p, {"type": "text", "text": "Describe."}]}], mode="ar",
                              max_new_tokens=6).token_ids for p in parts]
    assert all(o == outs[0] for o in outs)


def test_an_image_request_to_a_text_model_names_the_model(tiny, tiny_dir):
    with pytest.raises(GenerationError, match=f"the model at {tiny_dir} is a text-only model: it cannot take images"):
        tiny.generate(chat(A, "What is this?"))
    # text parts alone are fine for a text model: joined into the turn's text
    joined = tiny.generate([{"role": "user", "content": [{"type": "text", "text": "Tom has"}, {"type": "text", "text": "3"}]}],
                           max_new_tokens=4)
    assert joined.prompt_token_ids == tiny.generate("Tom has\n3", max_new_tokens=4).prompt_token_ids


def test_bad_images_fail_only_their_request_naming_the_part(tiny_vlm):
    with pytest.raises(GenerationError, match=r"prompts\[1\]\[0\].content\[1\]: not an image"):
        tiny_vlm.generate([PROMPTS[0], [{"role": "user", "content": [{"type": "text", "text": "x"},
                                                                     {"type": "image", "image": b"GIF89a broken"}]}]])
    with pytest.raises(GenerationError, match="never fetches URLs"):
        tiny_vlm.generate([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    with pytest.raises(GenerationError, match=r"<\|image_pad\|>\) at position 2 stands for an image"):
        tiny_vlm.generate([1, 5, IMAGE_PAD_ID, 7])
    typed = "Look: <|image_pad|>"  # typed into a chat turn, with or without an image part
    for prompt in (typed, chat(A, typed)):
        with pytest.raises(GenerationError, match="stands for an image's rows"):
            tiny_vlm.generate(prompt)
    with pytest.raises(GenerationError, match="content part must be"):
        tiny_vlm.generate([{"role": "user", "content": [{"type": "video", "video": "x"}]}])
    assert tiny_vlm.generate(PROMPTS[0], max_new_tokens=2).token_ids  # the model is fine afterwards


def test_too_many_image_positions_for_the_kv_cache_are_refused_before_any_work(tiny_vlm_dir):
    small = load(tiny_vlm_dir, max_batch=1, max_seq_len=64)
    big = picture(400, 300, 4)  # 11 x 15 cells: 1 + 11 * 16 = 177 positions
    with pytest.raises(GenerationError, match=r"messages\[0\].content\[0\]: the image \(400 x 300 pixels, 11 x 15 cells\) "
                                              r"needs 177 prompt positions, more than the 64"):
        small.generate(chat(big, "What?"))
    with pytest.raises(GenerationError, match=r"the prompt \(37 tokens, 17 of them for 2 images\) \+ max_new_tokens"):
        small.generate(chat(B, C, "What?"), max_new_tokens=40)
    assert small.image_encoder.encoded_images == 0


def test_the_cli_takes_images(tiny_vlm_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from nld_trt.cli import cli

    A.save(tmp_path / "a.png")
    B.save(tmp_path / "b.jpg")
    out = CliRunner().invoke(cli, ["generate", "--model", str(tiny_vlm_dir), "--image", str(tmp_path / "a.png"),
                                   "--image", str(tmp_path / "b.jpg"), "--max-new-tokens", "4", "--json", "Compare."])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output.strip().splitlines()[-1])
    assert len(data["images"]) == 2 and data["prompt_token_ids"].count(IMAGE_START_ID) == 2
    bad = CliRunner().invoke(cli, ["generate", "--model", str(tiny_vlm_dir), "--image", str(tmp_path / "a.png"), "--raw",
                                   "x"])
    assert bad.exit_code != 0 and "drop --raw" in str(bad.exception or bad.output)
