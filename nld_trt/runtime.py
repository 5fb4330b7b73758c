"""`nld_trt.load(path)`: a checkpoint on an executor, with `generate` for text or token ids, batched."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import LoRAAdapter, load_lora, load_vision_weights, load_weights
from .config import NLDConfig
from .decoding import SEQUENCE_TYPES, GenerationParams, Stats, run
from .decoding.auto import AutoPlanner
from .decoding.driver import page_manager
from .decoding.sequence import TokenLogprob
from .errors import CheckpointError, GenerationError
from .executors import TorchExecutor
from .executors.cost import CostModel
from .executors.torch_executor import compile_blocker, kernels_available
from .kv.layout import DEFAULT_PAGE_SIZE
from .model import NLDModel, Rotary
from .prompt import Prompt, PromptEncoder, engine_text_only
from .tokenizer import NLDTokenizer

DEFAULT_MODEL = Path(__file__).parent / "assets" / "tiny-nld"
DEFAULT_VLM = Path(__file__).parent / "assets" / "tiny-nld-vlm"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def default_model_path(images: bool = False) -> Path:
    """The embedded model a command uses without --model: the tiny VLM where images are given, else the text model."""
    return DEFAULT_VLM if images else DEFAULT_MODEL


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    mode: str
    finish_reason: str  # eos | length | stop
    stats: Stats
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprob] | None = None  # with logprobs=True: one per token id
    images: list[dict] | None = None  # image prompts: per image its span of prompt positions, grid, digest, note
    # with prompt_logprobs=N: one per prompt token, None for the first (nothing precedes it)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_token_ids": self.prompt_token_ids,
            "mode": self.mode,
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
            "stats": self.stats.as_dict(),
        }
        if self.images is not None:
            d["images"] = self.images
        if self.logprobs is not None:
            d["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob,
                              "top_logprobs": [list(t) for t in lp.top]} for lp in self.logprobs]
        if self.prompt_logprobs is not None:
            d["prompt_logprobs"] = [None if lp is None else {
                "token_id": lp.token_id, "logprob": lp.logprob, "rank": lp.rank,
                "top_logprobs": [list(t) for t in lp.top]} for lp in self.prompt_logprobs]
        return d


def build_model(config: NLDConfig, tensors: dict[str, torch.Tensor], device: str | torch.device, dtype) -> NLDModel:
    """The model with the checkpoint's weights, built without a random initialisation."""
    with torch.device("meta"):
        model = NLDModel(config)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, strict=True, assign=True)
    model.rotary = Rotary(config).to(device)
    return model.eval()


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if dtype not in names:
        raise GenerationError(f"unknown dtype {dtype!r}: use one of {', '.join(names)}")
    return names[dtype]


class NLD:
    """An NLD checkpoint ready to generate. Build it with `nld_trt.load`."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        max_batch: int = 8,
        max_seq_len: int = 2048,
        max_block_length: int = 128,
        lora: bool = True,
        calibration_dir: str | Path | None = None,
        compile: bool | None = None,
        progress: Callable[[str], None] | None = None,
        image_cache_bytes: int | None = None,
        kv_cache_tokens: int | None = None,
        kv_cache_gb: float | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        prefix_cache: bool = True,
    ) -> None:
        """`compile`: run the decode passes compiled (CPU: torch.compile) or as CUDA graphs (GPU), captured
        at load; False: the eager reference; None: CUDA graphs on a GPU (when Triton is installed and the
        checkpoint is not quantized), eager on CPU, where compiling costs more at load than a short run
        saves (README, "Benchmarks"). `progress` gets the load-time progress lines (default: stderr).
        `image_cache_bytes`: a vision-language checkpoint's cache of encoded images (default 256 MiB).

        The KV cache is a pool of pages (nld_trt/kv): `max_batch` is the most sequences decoding at once,
        `max_seq_len` the longest one, and the pool holds `kv_cache_tokens` positions or `kv_cache_gb` GiB
        (default: max_batch x max_seq_len positions; on a GPU at most 80% of its free memory) in pages of
        `page_size`. `prefix_cache`: reuse the K/V of cached prefixes (prompts, earlier turns' answers; an image
        prompt's pages are keyed by its images' content too)."""
        self.path = Path(path) if path is not None else default_model_path()
        if not self.path.is_dir():
            raise CheckpointError(f"model directory {self.path} does not exist")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise GenerationError("device cuda requested but PyTorch sees no GPU: install a CUDA build or use --device cpu")
        self.config = NLDConfig.from_file(self.path)
        self.tokenizer = NLDTokenizer(self.path)
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise CheckpointError(
                f"{self.path}: the tokenizer has {self.tokenizer.vocab_size} tokens but vocab_size is "
                f"{self.config.vocab_size}"
            )
        self.dtype = resolve_dtype(dtype, device)
        max_seq_len = min(max_seq_len, self.config.max_position_embeddings)
        from .engine.loader import image_refusal, is_engine_dir, open_engine

        self.model: NLDModel | None = None
        self.lora: LoRAAdapter | None = None
        self.calibration_dir = calibration_dir  # None: the user cache (nld_trt/executors/cost.py)
        self._planner: AutoPlanner | None = None
        self.vlm = None  # a vision-language checkpoint's VLMConfig
        self.image_encoder = None  # its vision encoder (nld_trt/vision/encoder.py)
        kv = dict(kv_cache_tokens=kv_cache_tokens, kv_cache_gb=kv_cache_gb, page_size=page_size)
        if is_engine_dir(self.path):  # a `nld-trt build` output: its graph or plan runs the passes
            self.executor = open_engine(self.path, self.config, device, max_batch, max_seq_len, max_block_length, **kv)
            self._set_pages(prefix_cache)
            refusal = image_refusal(self.path, device) if self.config.is_vlm else None
            if self.config.is_vlm and refusal is None:
                self._load_engine_vision(device, image_cache_bytes)
            self.prompts = self._prompt_encoder(None if refusal is None else engine_text_only(str(self.path), refusal))
            return
        if self.config.quantization_config is not None:  # a ModelOpt FP8 / INT4 AWQ export
            from .quant.loader import load_quantized_model

            self.model = load_quantized_model(self.path, self.config, device, self.dtype)
        else:
            self.model = build_model(self.config, load_weights(self.path, self.config), device, self.dtype)
        self.lora = load_lora(self.path, self.config) if lora else None
        if self.lora is not None:
            self.model.set_lora(self.lora.layers, self.lora.scale)
        if compile is None:
            compile = self.model.encoder.embed_tokens.weight.device.type == "cuda" and kernels_available() \
                and compile_blocker(self.model) is None
        self.executor = TorchExecutor(self.model, max_batch, max_seq_len, max_block_length, compile=compile,
                                      progress=progress or _stderr, **kv)
        self._set_pages(prefix_cache)
        if self.config.is_vlm:
            self._load_vision(device, image_cache_bytes)
        self.prompts = self._prompt_encoder()

    def _load_vision(self, device: str, cache_bytes: int | None) -> None:
        """The vision tower + projector beside the text model (never inside its forward), in its dtype."""
        from .vision.config import VLMConfig
        from .vision.encoder import DEFAULT_CACHE_BYTES, ImageEncoder
        from .vision.tower import build_vision_encoder

        self.vlm = VLMConfig.from_file(self.path)
        p = self.model.encoder.embed_tokens.weight
        tower = build_vision_encoder(self.vlm, load_vision_weights(self.path, self.vlm), device,
                                     self.dtype if self.dtype in (torch.float32, torch.float64) else torch.bfloat16)
        self.image_encoder = ImageEncoder(tower, p.dtype, p.device,
                                          DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes)

    def _load_engine_vision(self, device: str, cache_bytes: int | None) -> None:
        """An engine build's vision encoder: its vision plan (GPU) or graph (ONNX Runtime), rows in its dtype."""
        from .engine.loader import open_vision
        from .vision.config import VLMConfig
        from .vision.encoder import DEFAULT_CACHE_BYTES, ImageEncoder

        self.vlm = VLMConfig.from_file(self.path)
        encoder = open_vision(self.path, self.vlm, device)
        self.image_encoder = ImageEncoder(encoder, encoder.rows_dtype, encoder.device,
                                          DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes)

    def _prompt_encoder(self, no_images: str | None = None) -> PromptEncoder:
        processor = None
        if self.vlm is not None:
            from .vision.processor import ImageProcessor, ProcessorConfig

            processor = ImageProcessor(ProcessorConfig.from_checkpoint(self.path, self.vlm.vision.patch_size,
                                                                       self.vlm.spatial_merge_size))
        return PromptEncoder(self.tokenizer, self.config, self.executor.max_seq_len, f"the model at {self.path}",
                             processor, no_images)

    def _set_pages(self, prefix_cache: bool) -> None:
        if not isinstance(prefix_cache, bool):
            raise GenerationError(f"prefix_cache must be true or false, got {prefix_cache!r}")
        self.pages = page_manager(self.executor)  # who holds which page, the prefix index (nld_trt/kv)
        self.pages.prefix_cache = prefix_cache

    # ----------------------------------------------------------------------------------------------
    @property
    def planner(self) -> AutoPlanner:
        """What chooses the steps of `auto` requests; its pass-cost model is measured (or loaded) on first use."""
        if self._planner is None:
            self._planner = AutoPlanner(self.calibrate)
        return self._planner

    def calibrate(self, progress=None) -> CostModel:
        """The executor's pass-cost model: the saved one for this executor and device, else measured now."""
        from .executors.cost import load_or_calibrate

        model, path, measured = load_or_calibrate(self.executor, self.pages, self.calibration_dir, progress)
        self.calibration_file = path
        self.calibration_measured = measured
        return model

    def encode(self, prompt: str, chat: bool = True, **template_kwargs: Any) -> list[int]:
        """Token ids of a text prompt: through the chat template (a user turn + generation prompt) or raw."""
        return self.prompts.text(prompt, chat=chat, template_kwargs=template_kwargs).ids

    def check_fits(self, prompt_len: int, params: GenerationParams, remedy: str,
                   tokens_name: str = "max_new_tokens", detail: str = "") -> None:
        """Refuse a request whose prompt and generation would overrun the longest sequence the KV cache takes
        (before it takes pages: such a request always fits the pool alone); `tokens_name` is what the caller
        calls max_new_tokens (serving: max_tokens); `detail` says more about the prompt's tokens
        (Prompt.describe: how many are image positions)."""
        need = params.cache_positions(prompt_len)
        if need > self.executor.max_seq_len:
            raise GenerationError(
                f"the prompt ({prompt_len} tokens{detail}) + {tokens_name} ({params.max_new_tokens})"
                + (f" + block_length ({params.block_length})" if params.mode != "ar" else "")
                + f" needs {need} KV-cache positions, more than the {self.executor.max_seq_len} available: {remedy}"
            )

    def generate(self, prompts, *, chat: bool = True, template_kwargs: dict | None = None, **params: Any):
        """Generate for one prompt or a list of them; params as GenerationParams. A prompt is text (through the
        chat template unless chat=False), token ids, or a conversation: a list of {"role", "content"} messages
        whose content may hold image parts ({"type": "image", "image": PIL image | path | bytes} or
        {"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}) for a vision-language model.

        Returns a GenerationResult, or a list of them for a list of prompts. Sequence i of a batch samples
        with seed + i, so a batch gives the same results as the same prompts one by one. `bad_words` may mix
        strings (tokenized as they are, without special tokens, as TensorRT-LLM does) and token-id lists.
        """
        single = isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and bool(prompts)
            and (all(isinstance(t, int) for t in prompts) or all(isinstance(m, dict) for m in prompts))
        )
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise GenerationError("no prompts given")
        if params.get("bad_words"):
            params["bad_words"] = self.tokenizer.word_ids(params["bad_words"])
        try:
            p = GenerationParams(**params).resolved(self.config)
        except TypeError as e:
            raise GenerationError(f"unknown generation parameter: {e}") from None
        p.validate(self.config, self.executor.max_chunk)
        encoded = [self.prompts.encode(x, chat=chat, template_kwargs=template_kwargs, local_files=True,
                                       field="the prompt" if single else f"prompts[{i}]") for i, x in enumerate(batch)]
        for x in encoded:
            self.check_fits(len(x.ids), p, "shorten the prompt, lower max_new_tokens, or load with a larger max_seq_len",
                            detail=x.describe())
        seq_type = SEQUENCE_TYPES[p.mode]
        seqs = [seq_type(x.ids, p, self.config, p.seed + i, self.tokenizer.decode, images=self.bind_images(x))
                for i, x in enumerate(encoded)]
        if p.mode == "auto":
            self.planner.model  # calibrated (or loaded) before this call takes pages
        run(self.executor, seqs, planner=self.planner if p.mode == "auto" else None, pages=self.pages)
        failed = [s for s in seqs if s.error is not None]
        if failed:
            raise GenerationError(f"generation failed: {failed[0].error}")
        results = [
            GenerationResult(
                text=s.text(),
                token_ids=s.out,
                prompt_token_ids=s.prompt,
                mode=p.mode,
                finish_reason=s.finish_reason or "length",
                stats=s.stats,
                stop_reason=s.stop_reason,
                logprobs=s.logprobs if p.logprobs else None,
                images=[{"start": span.start, "end": span.end, **img.describe()}
                        for span, img in zip(x.images, x.pixels)] if x.images else None,
                prompt_logprobs=s.prompt_logprobs,
            )
            for s, x in zip(seqs, encoded)
        ]
        return results[0] if single else results

    def bind_images(self, prompt: Prompt):
        """A prompt's images bound to the vision encoder (what its prefill asks for rows), None without images."""
        if not prompt.images:
            return None
        if self.image_encoder is None:
            raise GenerationError(self.prompts.no_images)
        return self.image_encoder.bind(prompt)


def load(path: str | Path | None = None, **kwargs: Any) -> NLD:
    """Load an NLD checkpoint directory (default: the embedded tiny model). kwargs: see `NLD`."""
    return NLD(path, **kwargs)
