"""Images -> the vision encoder's input: decoding with guards, the reference's resize and normalisation.

Matches the checkpoint's `image_processing.py` (a port of mistral_common's image encoder), read through public
ports: the longest edge is capped at 1400 pixels (Python's round on the scaled sides), each side is then
rounded UP to a multiple of patch x merge = 28, the image is resized with OpenCV's `INTER_CUBIC` on float32 RGB
(PIL's bicubic differs), divided by 255 and normalised with the CLIP mean and std. A non-RGB image is converted
to RGBA and pasted on white (transparent pixels become white), exactly as the reference does; EXIF rotation is
not applied (the reference does not). `preprocessor_config.json`, where a checkpoint has one, can change the
longest edge, mean and std.

Decoding is where untrusted bytes meet a C library, so it is guarded: only PNG, JPEG, WebP, GIF and BMP are
opened (PIL would otherwise also try formats that run external programs), the encoded size and the pixel
count are capped before any pixel is decoded (PIL's decompression-bomb limit is set to the same cap), and a
truncated or unreadable image fails with the part's name. Modes the reference handles loosely are made
explicit: a 16-bit grayscale image is reduced to 8 bits (the reference would clip it to white), CMYK and
palette images are converted by PIL, an animated image gives its first frame; `PreparedImage.note` says so.
Integer (32-bit) and float images are refused.

Each image gets a content digest (BLAKE2b of its RGB pixels, size and the processor geometry): equal digests
mean equal encoder inputs, so the encoder's cache and prefix caching can key on it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, GenerationError
from ..fileutil import read_json_object

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LONGEST_EDGE = 1400
MAX_IMAGE_PIXELS = 8192 * 8192  # decoded pixels per image: PIL's decompression-bomb limit is set to this
MAX_IMAGE_BYTES = 32 * 1024 * 1024  # encoded bytes per image
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
PREPROCESSOR_FILE = "preprocessor_config.json"


class ImageError(GenerationError):
    """An image content part cannot be used: the message names the part and the problem."""


@dataclass(frozen=True)
class ProcessorConfig:
    longest_edge: int = LONGEST_EDGE
    patch_size: int = 14
    merge: int = 2
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    max_pixels: int = MAX_IMAGE_PIXELS
    max_bytes: int = MAX_IMAGE_BYTES

    @property
    def cell(self) -> int:
        return self.patch_size * self.merge

    def to_dict(self) -> dict[str, Any]:
        """`preprocessor_config.json` of a checkpoint processed this way (the fields `from_checkpoint` reads, in
        transformers' PixtralImageProcessor spelling)."""
        return {"image_processor_type": "PixtralImageProcessor", "size": {"longest_edge": self.longest_edge},
                "patch_size": {"height": self.patch_size, "width": self.patch_size},
                "spatial_merge_size": self.merge, "do_resize": True, "resample": 3, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(self.mean),
                "image_std": list(self.std), "do_convert_rgb": True}

    @classmethod
    def from_checkpoint(cls, directory: str | Path, patch_size: int, merge: int) -> ProcessorConfig:
        """The checkpoint's preprocessor_config.json where it has one (its longest edge, mean, std), the
        reference's values otherwise. Fields that would make the processing differ from ours are refused."""
        path = Path(directory) / PREPROCESSOR_FILE
        if not path.is_file():
            return cls(patch_size=patch_size, merge=merge)
        raw = read_json_object(path, CheckpointError)

        def fail(msg: str) -> CheckpointError:
            return CheckpointError(f"{path}: {msg}")

        size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
        edge = raw.get("longest_edge", raw.get("max_image_size", size.get("longest_edge", LONGEST_EDGE)))
        if isinstance(edge, bool) or not isinstance(edge, int) or edge < 1:
            raise fail(f"the longest edge must be a positive integer, found {edge!r}")
        p = raw.get("patch_size", patch_size)
        p = p.get("height", patch_size) if isinstance(p, dict) else p
        if p != patch_size:
            raise fail(f"patch_size {p!r} differs from vision_config.patch_size {patch_size}")
        m = raw.get("spatial_merge_size", raw.get("merge_size", merge))
        if m != merge:
            raise fail(f"spatial_merge_size {m!r} differs from config.json's {merge}")
        for key in ("do_rescale", "do_normalize", "do_convert_rgb", "do_resize"):
            if raw.get(key, True) is not True:
                raise fail(f"{key} is {raw[key]!r}: nld-trt processes images as the reference does (all of them on)")
        factor = raw.get("rescale_factor", 1 / 255)
        if not isinstance(factor, (int, float)) or abs(factor - 1 / 255) > 1e-9:
            raise fail(f"rescale_factor {factor!r} is not 1/255")

        def triple(key: str, default: tuple) -> tuple[float, float, float]:
            v = raw.get(key, list(default))
            if (not isinstance(v, list) or len(v) != 3
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                raise fail(f"{key} must be a list of 3 numbers, found {v!r}")
            return tuple(float(x) for x in v)

        std = triple("image_std", CLIP_STD)
        if min(std) <= 0:
            raise fail(f"image_std must be positive, found {list(std)}")
        return cls(longest_edge=edge, patch_size=patch_size, merge=merge, mean=triple("image_mean", CLIP_MEAN), std=std)


@dataclass
class PreparedImage:
    """One image ready for the encoder: normalised pixels [3, rows x cell, cols x cell] and what it becomes."""

    pixels: torch.Tensor  # float32
    grid: tuple[int, int]  # merged cells: (rows, cols)
    source_size: tuple[int, int]  # the decoded image's (width, height)
    digest: str  # content hash: equal digests, equal encoder inputs
    note: str | None = None  # what was done to an unusual image (mode converted, first frame taken)

    @property
    def cells(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def positions(self) -> int:
        """Prompt positions of the expanded image: <|image_start|>, then per row its pads and a break (the
        last one <|image_end|>): 1 + rows x (cols + 1)."""
        return 1 + self.grid[0] * (self.grid[1] + 1)

    def describe(self) -> dict[str, Any]:
        return {"size": list(self.source_size), "grid": list(self.grid), "positions": self.positions,
                "digest": self.digest, **({"note": self.note} if self.note else {})}


def _pil():
    from PIL import Image

    return Image


class ImageProcessor:
    """Decodes image inputs (with the guards above) and prepares them as the reference does."""

    def __init__(self, config: ProcessorConfig | None = None) -> None:
        self.config = config or ProcessorConfig()
        Image = _pil()
        Image.MAX_IMAGE_PIXELS = self.config.max_pixels  # explicit: PIL raises DecompressionBombError past 2x this

    # geometry ---------------------------------------------------------------------------------------
    def grid(self, width: int, height: int) -> tuple[int, int]:
        """Merged cells (rows, cols) of a width x height image: the longest edge capped (Python's round on the
        scaled sides), each side rounded up to whole cells, at least one cell a side."""
        edge, cell = self.config.longest_edge, self.config.cell
        ratio = max(width / edge, height / edge)
        if ratio > 1:
            width, height = round(width / ratio), round(height / ratio)
        return (max(height, 1) - 1) // cell + 1, (max(width, 1) - 1) // cell + 1

    # decoding ---------------------------------------------------------------------------------------
    def decode_bytes(self, data: bytes, where: str):
        """An image from encoded bytes, opened in the allowed formats and size-checked before decoding."""
        Image = _pil()
        from PIL import UnidentifiedImageError

        if len(data) > self.config.max_bytes:
            raise ImageError(f"{where}: the image is {len(data)} bytes, over the limit of {self.config.max_bytes}")
        if not data:
            raise ImageError(f"{where}: the image is empty (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{where}: the image is over the limit of {self.config.max_pixels} pixels (the guard "
                             "against decompression bombs)") from None
        except UnidentifiedImageError:
            raise ImageError(f"{where}: not an image in a supported format ({', '.join(FORMATS)})") from None
        except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error, ... on bad data
            raise ImageError(f"{where}: the image is truncated or corrupted ({type(e).__name__}: {e})") from None
        return image

    def decode_path(self, path: str | Path, where: str):
        p = Path(path)
        if not p.is_file():
            raise ImageError(f"{where}: no image file {str(p)!r}")
        if p.stat().st_size > self.config.max_bytes:
            raise ImageError(f"{where}: {p} is {p.stat().st_size} bytes, over the limit of {self.config.max_bytes}")
        return self.decode_bytes(p.read_bytes(), where)

    def decode_data_url(self, url: str, where: str):
        """`data:image/...;base64,...` (the only URL nld-trt accepts: it never fetches one)."""
        head, sep, payload = url.partition(",")
        if not sep or not head.startswith("data:") or not head.endswith(";base64"):
            raise ImageError(f"{where}: a data URL must look like data:image/png;base64,<data>")
        media = head[len("data:"):-len(";base64")]
        if media and not media.startswith("image/"):
            raise ImageError(f"{where}: the data URL's media type is {media!r}, not an image/* type")
        if len(payload) > self.config.max_bytes * 4 // 3 + 4:
            raise ImageError(f"{where}: the image is over the limit of {self.config.max_bytes} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(f"{where}: the data URL's payload is not valid base64") from None
        return self.decode_bytes(data, where)

    # preparing --------------------------------------------------------------------------------------
    def rgb(self, image, where: str) -> tuple[np.ndarray, str | None]:
        """uint8 [H, W, 3] RGB of a PIL image as the reference makes it, and a note on what was converted."""
        Image = _pil()
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageError(f"{where}: the image is {width} x {height} pixels (zero-sized)")
        if width * height > self.config.max_pixels:
            raise ImageError(f"{where}: the image is {width} x {height} = {width * height} pixels, over the limit of "
                             f"{self.config.max_pixels} pixels (the guard against decompression bombs)")
        notes = []
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            image.seek(0)
            notes.append(f"animated ({frames} frames): the first frame is used")
        try:
            image.load()
        except Exception as e:  # noqa: BLE001 - PIL: "image file is truncated", broken streams, decoder errors
            raise ImageError(f"{where}: the image is truncated or corrupted ({type(e).__name__}: {e})") from None
        mode = image.mode
        if mode.startswith("I;16"):
            image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8), mode="L")
            notes.append(f"16-bit grayscale ({mode}) reduced to 8 bits")
        elif mode in ("I", "F"):
            raise ImageError(f"{where}: {'32-bit integer' if mode == 'I' else 'floating-point'} images (mode {mode}) "
                             "are not supported: send an 8-bit image (PNG or JPEG)")
        elif mode == "CMYK":
            notes.append("CMYK converted to RGB (PIL's conversion, no colour profile)")
        elif mode in ("P", "PA"):
            notes.append("palette image converted to RGB")
        if image.mode != "RGB":  # the reference: to RGBA, then pasted on white (transparent -> white)
            try:
                rgba = image.convert("RGBA")
            except ValueError as e:
                raise ImageError(f"{where}: image mode {image.mode} cannot be converted to RGB ({e})") from None
            white = Image.new("RGBA", rgba.size, "WHITE")
            white.paste(rgba, (0, 0), rgba)
            image = white.convert("RGB")
        return np.asarray(image, dtype=np.uint8), "; ".join(notes) or None

    def prepare(self, image, where: str) -> PreparedImage:
        """A decoded PIL image -> normalised pixels at its grid's size, with its digest."""
        import cv2

        rgb, note = self.rgb(image, where)
        height, width = rgb.shape[:2]
        rows, cols = self.grid(width, height)
        cell = self.config.cell
        geometry = f"{width}x{height}:{self.config.longest_edge}:{cell}:{self.config.mean}:{self.config.std}"
        h = hashlib.blake2b(geometry.encode(), digest_size=16)
        h.update(rgb.tobytes())
        digest = h.hexdigest()
        resized = cv2.resize(rgb.astype(np.float32), (cols * cell, rows * cell), interpolation=cv2.INTER_CUBIC)
        # as the reference: float32 / 255, then float64 mean/std, then float32 for the tower
        normalised = (resized / 255.0 - np.array(self.config.mean)) / np.array(self.config.std)
        pixels = torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32))
        return PreparedImage(pixels, (rows, cols), (width, height), digest, note)

    def from_pixels(self, array: np.ndarray, where: str):
        """A PIL image of a uint8 [height, width, 3 or 4] array (RGB or RGBA pixels, as TensorRT-LLM's clients
        send `image_bytes_input`), size-checked like an encoded image."""
        Image = _pil()
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (3, 4):
            raise ImageError(f"{where}: image pixels must be uint8 [height, width, 3] (RGB) or [height, width, 4] "
                             f"(RGBA), got {array.dtype} {list(array.shape)}")
        height, width = array.shape[:2]
        if width < 1 or height < 1:
            raise ImageError(f"{where}: the image is {width} x {height} pixels (zero-sized)")
        if width * height > self.config.max_pixels:
            raise ImageError(f"{where}: the image is {width} x {height} = {width * height} pixels, over the limit of "
                             f"{self.config.max_pixels} pixels")
        return Image.fromarray(np.ascontiguousarray(array))  # RGB or RGBA, from the shape

    def load(self, value: Any, where: str, *, local_files: bool) -> PreparedImage:
        """Any accepted image value -> PreparedImage: a PIL image, encoded bytes, a data URL, uint8 pixels
        [height, width, 3 or 4], or (only with `local_files`, i.e. from the Python API or the CLI, never from a
        served request) a file path."""
        Image = _pil()
        if isinstance(value, Image.Image):
            return self.prepare(value, where)
        if isinstance(value, np.ndarray):
            return self.prepare(self.from_pixels(value, where), where)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self.prepare(self.decode_bytes(bytes(value), where), where)
        if isinstance(value, str) and value.startswith("data:"):
            return self.prepare(self.decode_data_url(value, where), where)
        if isinstance(value, str) and value.startswith(("http://", "https://", "ftp://")):
            raise ImageError(f"{where}: nld-trt never fetches URLs; send the image inline as a data URL "
                             "(data:image/png;base64,...)")
        if isinstance(value, (str, Path)):
            if not local_files:
                raise ImageError(f"{where}: a served request cannot name a local file; send the image inline as a "
                                 "data URL (data:image/png;base64,...)")
            path = str(value).removeprefix("file://") if isinstance(value, str) else value
            return self.prepare(self.decode_path(path, where), where)
        raise ImageError(f"{where}: an image must be a PIL image, bytes, a data URL, uint8 pixels"
                         + (" or a file path" if local_files else "") + f", got {type(value).__name__}")
