"""Images are prepared exactly as the reference's processor prepares them (mistral_common's recipe, with
OpenCV's INTER_CUBIC), and bad images fail with an error naming the part and the problem."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from nld_trt.vision.processor import CLIP_MEAN, CLIP_STD, ImageError, ImageProcessor, ProcessorConfig

WHERE = "messages[0].content[1]"


def reference_pixels(image: Image.Image, longest: int = 1400, cell: int = 28) -> np.ndarray:
    """The reference's steps written out literally: to RGBA and pasted on white unless RGB, token grid by
    Python's round and ceiling division, cv2 INTER_CUBIC on float32, /255, CLIP mean/std, CHW."""
    import cv2

    if image.mode != "RGB":
        if image.mode != "RGBA":
            image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, "WHITE")
        white.paste(image, (0, 0), image)
        image = white.convert("RGB")
    w, h = image.size
    ratio = max(h / longest, w / longest)
    if ratio > 1:
        w, h = round(w / ratio), round(h / ratio)
    size = (((w - 1) // cell + 1) * cell, ((h - 1) // cell + 1) * cell)
    arr = cv2.resize(np.array(image, dtype=np.float32), size, interpolation=cv2.INTER_CUBIC)
    arr = arr / 255.0
    arr = (arr - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return arr.transpose(2, 0, 1)


def noisy(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None, "LA": 2}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def png(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("size,grid", [
    ((300, 200), (8, 11)), ((28, 28), (1, 1)), ((29, 1), (1, 2)), ((2800, 1400), (25, 50)), ((4201, 3), (1, 50)),
    ((1540, 1540), (50, 50)), ((3080, 770), (13, 50)), ((50, 100), (4, 2)), ((1500, 3000), (50, 25)),
    ((1401, 1401), (50, 50)), ((308, 224), (8, 11)),
])
def test_the_token_grid_follows_the_reference_rule(size, grid):
    """(width, height) -> (rows, cols) of 28-pixel cells: values the public ports pin against the reference."""
    assert ImageProcessor().grid(*size) == grid


@pytest.mark.parametrize("size,mode", [((37, 23), "RGB"), ((13, 61), "RGBA"), ((1503, 997), "RGB"), ((57, 29), "L"),
                                       ((90, 31), "LA"), ((28, 28), "RGB")])
def test_pixels_equal_the_reference_recipe_on_odd_sizes_and_transparency(size, mode):
    image = noisy(*size, mode=mode, seed=size[0])
    prepared = ImageProcessor().prepare(image, WHERE)
    expected = torch.from_numpy(reference_pixels(image).astype(np.float32))
    assert prepared.pixels.shape == expected.shape
    assert torch.equal(prepared.pixels, expected)
    assert prepared.pixels.shape[1:] == (prepared.grid[0] * 28, prepared.grid[1] * 28)
    assert prepared.positions == 1 + prepared.grid[0] * (prepared.grid[1] + 1)


def test_opencv_bicubic_is_used_not_pils():
    image = noisy(37, 23)
    prepared = ImageProcessor().prepare(image, WHERE)
    pil = np.asarray(image.resize((56, 28), Image.BICUBIC), dtype=np.float32) / 255.0
    pil = (pil - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert np.abs(prepared.pixels.numpy() - pil.transpose(2, 0, 1)).max() > 0.05


def test_transparent_pixels_become_white_and_exif_rotation_is_not_applied():
    clear = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    pixels = ImageProcessor().prepare(clear, WHERE).pixels
    assert torch.allclose(pixels, white[:, None, None].expand_as(pixels), atol=1e-5)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": the reference ignores it
    data = png(Image.new("RGB", (56, 28), (200, 10, 10)), "JPEG", exif=exif.tobytes())
    prepared = ImageProcessor().load(data, WHERE, local_files=False)
    assert prepared.source_size == (56, 28) and prepared.grid == (1, 2)


def test_inputs_of_every_kind_give_the_same_image_and_digest(tmp_path):
    image = noisy(45, 33, seed=4)
    data = png(image)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    proc = ImageProcessor()
    got = [proc.load(v, WHERE, local_files=True) for v in (image, data, url, str(path), path, f"file://{path}")]
    assert len({g.digest for g in got}) == 1
    assert all(torch.equal(g.pixels, got[0].pixels) for g in got)
    assert proc.prepare(noisy(45, 33, seed=5), WHERE).digest != got[0].digest
    # the digest covers the processor geometry too
    assert ImageProcessor(ProcessorConfig(longest_edge=28)).prepare(image, WHERE).digest != got[0].digest


def test_the_longest_edge_mean_and_std_come_from_preprocessor_config(tmp_path):
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"longest_edge": 56}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0], "patch_size": 14}))
    config = ProcessorConfig.from_checkpoint(tmp_path, 14, 2)
    assert config.longest_edge == 56 and config.mean == (0.5, 0.5, 0.5)
    proc = ImageProcessor(config)
    assert proc.grid(300, 100) == (1, 2)
    px = proc.prepare(Image.new("RGB", (30, 30), (255, 255, 255)), WHERE).pixels
    assert torch.allclose(px[:, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    from nld_trt.errors import CheckpointError

    with pytest.raises(CheckpointError, match="do_normalize"):
        ProcessorConfig.from_checkpoint(tmp_path, 14, 2)


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the data would decompress to gigabytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("value,message", [
    (b"this is not an image at all", "not an image in a supported format"),
    (png(noisy(64, 64))[:300], "truncated or corrupted"),
    (png(noisy(64, 64), "JPEG")[:400], "truncated or corrupted"),
    (bomb_png(100_000, 100_000), "over the limit of 67108864 pixels .*decompression bombs"),
    (bomb_png(9000, 9000), "over the limit of 67108864 pixels .*decompression bombs"),
    (Image.new("L", (9000, 9000)), "9000 x 9000 = 81000000 pixels, over the limit"),
    (Image.new("RGB", (0, 5)), "zero-sized"),
    (b"", "empty"),
    (Image.new("I", (4, 4)), "32-bit integer"),
    (Image.new("F", (4, 4)), "floating-point"),
    ("https://example.com/cat.png", "never fetches URLs"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:text/plain;base64,aGk=", "not an image"),
    ("data:image/png,rawtext", "data URL"),
    (12, "got int"),
])
def test_bad_images_fail_naming_the_part_and_the_problem(value, message):
    with pytest.raises(ImageError, match=message) as err:
        ImageProcessor().load(value, WHERE, local_files=False)
    assert str(err.value).startswith(WHERE)


def test_a_served_request_cannot_name_a_local_file(tmp_path):
    path = tmp_path / "secret.png"
    path.write_bytes(png(noisy(8, 8)))
    for value in (str(path), path, f"file://{path}"):
        with pytest.raises(ImageError, match="cannot name a local file"):
            ImageProcessor().load(value, WHERE, local_files=False)


def test_formats_outside_the_allowlist_are_refused():
    with pytest.raises(ImageError, match="supported format"):
        ImageProcessor().load(png(noisy(8, 8), "TIFF"), WHERE, local_files=False)


def test_unusual_modes_are_converted_and_say_so():
    proc = ImageProcessor()
    cmyk = proc.load(png(Image.new("CMYK", (30, 30), (0, 255, 0, 0)), "JPEG"), WHERE, local_files=False)
    assert "CMYK" in cmyk.note
    gray16 = Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16))
    assert gray16.mode == "I;16"
    g = proc.prepare(gray16, WHERE)
    assert "16-bit" in g.note
    eight = Image.fromarray((np.asarray(gray16) >> 8).astype(np.uint8), mode="L")
    assert torch.equal(g.pixels, proc.prepare(eight, WHERE).pixels)  # reduced to 8 bits, not clipped to white
    palette = noisy(30, 30).convert("P")
    assert "palette" in proc.prepare(palette, WHERE).note
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    gif = proc.load(buf.getvalue(), WHERE, local_files=False)
    assert "first frame" in gif.note and "3 frames" in gif.note
    assert torch.equal(gif.pixels, proc.prepare(frames[0].convert("P").convert("RGB"), WHERE).pixels)
