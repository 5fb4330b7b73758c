"""The runtime side of the vision encoder: images of admitted requests -> embedding rows, each image once.

`ImageEncoder` runs the tower + projector (nld_trt/vision/tower.py) when a request is admitted (its prefill
asks for the rows), batching the request's images under Pixtral's block-diagonal mask while the batch stays
small (a block-diagonal mask over many patches costs memory quadratic in their number; large images run one at
a time), and keeps the rows in an LRU cache keyed by the image's content digest, bounded in bytes: a multi-turn
chat that sends the same image again, or two requests with one image, encode it once. The cache is shared by
threads (a served model encodes on an image worker thread while the scheduler thread decodes): its lookups and
stores hold a lock, the encoding itself does not.

`PromptImages` binds one prompt's image spans to the encoder: the prefill of positions [start, end) gets
`ChunkEmbeds` for the pad positions in that range, the projector's rows in order (row by row of cells), which
replace those positions' token embeddings. The start, break and end tokens keep their own embeddings. A
prefill that starts past an image (its pages came from the prefix cache) does not need it encoded. Its
`extra_keys` (each image's span and content digest) key the prompt's KV pages in the prefix cache
(nld_trt/kv/pages.py): the same pad ids with another picture are other pages.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import torch

from ..executors.base import ChunkEmbeds
from ..kv.events import ExtraKey
from ..prompt import Prompt
from .processor import PreparedImage
from .tower import VisionEncoder

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
BATCH_PATCHES = 4096  # images batched under one block-diagonal mask while their patches stay within this


class ImageEncoder:
    """Encodes prepared images to text-width rows (dtype and device of the text model), cached by digest."""

    def __init__(self, encoder: VisionEncoder, dtype: torch.dtype, device, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 batch_patches: int = BATCH_PATCHES) -> None:
        self.encoder = encoder
        self.dtype = dtype
        self.device = torch.device(device)
        self.cache_bytes = cache_bytes
        self.batch_patches = batch_patches
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.encoded_images = 0
        self.encode_s = 0.0

    @property
    def cached(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        """Forget every cached image (benchmarks: each request then pays its encode)."""
        with self._lock:
            self._cache.clear()
            self._bytes = 0

    def rows(self, images: list[PreparedImage]) -> list[torch.Tensor]:
        """[cells, hidden] per image, in order; images not cached are encoded (batched) and cached."""
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, PreparedImage] = {}
        with self._lock:
            for image in images:
                if image.digest in found or image.digest in todo:
                    continue
                if image.digest in self._cache:
                    self._cache.move_to_end(image.digest)
                    found[image.digest] = self._cache[image.digest]
                    self.hits += 1
                else:
                    todo[image.digest] = image
                    self.misses += 1
        for batch in self._batches(list(todo.values())):
            for image, rows in zip(batch, self._encode(batch)):
                found[image.digest] = rows
                with self._lock:
                    self._store(image.digest, rows)
        return [found[image.digest] for image in images]

    def _batches(self, images: list[PreparedImage]) -> list[list[PreparedImage]]:
        p = self.encoder.config.vision.patch_size
        batches: list[list[PreparedImage]] = []
        patches = 0
        for image in images:
            n = (image.pixels.shape[1] // p) * (image.pixels.shape[2] // p)
            if batches and patches + n <= self.batch_patches:
                batches[-1].append(image)
                patches += n
            else:
                batches.append([image])
                patches = n
        return batches

    @torch.inference_mode()
    def _encode(self, images: list[PreparedImage]) -> list[torch.Tensor]:
        start = time.perf_counter()
        pixels = [img.pixels.to(self.encoder.device, self.encoder.dtype) for img in images]
        rows = [r.to(self.device, self.dtype) for r in self.encoder(pixels)]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        with self._lock:
            self.encode_s += time.perf_counter() - start
            self.encoded_images += len(images)
        return rows

    def _store(self, digest: str, rows: torch.Tensor) -> None:
        if digest in self._cache:  # another thread encoded the same image meanwhile
            return
        size = rows.numel() * rows.element_size()
        if size > self.cache_bytes:
            return
        self._cache[digest] = rows
        self._bytes += size
        while self._bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def bind(self, prompt: Prompt) -> PromptImages | None:
        """The prompt's images bound to this encoder (None for a prompt without images)."""
        return PromptImages(prompt, self) if prompt.images else None


class PromptImages:
    """One prompt's images, bound to the encoder: the embedding rows of any range of its positions."""

    def __init__(self, prompt: Prompt, encoder: ImageEncoder) -> None:
        self.spans = prompt.images
        self.extra_keys = tuple(ExtraKey(start, end, bytes.fromhex(digest)) for start, end, digest in prompt.spans)
        self._pixels: tuple[PreparedImage, ...] | None = prompt.pixels
        self._encoder = encoder
        self._rows: list[torch.Tensor] | None = None

    def rows(self) -> list[torch.Tensor]:
        """Every image's rows (encoded at the first call: the request's admission); the pixels are then dropped."""
        if self._rows is None:
            self._rows = self._encoder.rows(list(self._pixels))
            self._pixels = None
        return self._rows

    def chunk(self, start: int, end: int) -> ChunkEmbeds | None:
        """The rows replacing the pad positions among prompt positions [start, end), chunk-relative."""
        positions: list[int] = []
        pieces: list[torch.Tensor] = []
        if all(span.end <= start or span.start >= end for span in self.spans):
            return None  # e.g. the images' pages came from the prefix cache: nothing to encode
        for span, rows in zip(self.spans, self.rows()):
            if span.end <= start or span.start >= end:
                continue
            pads = span.pad_positions()
            keep = [k for k, p in enumerate(pads) if start <= p < end]
            if keep:
                positions += [pads[k] - start for k in keep]
                pieces.append(rows[keep[0]: keep[-1] + 1])  # pads in range are consecutive cells
        if not positions:
            return None
        return ChunkEmbeds(tuple(positions), torch.cat(pieces))
