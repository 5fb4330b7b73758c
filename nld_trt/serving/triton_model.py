"""The Triton Python-backend model behind `nld` (decoupled, streaming) and `nld_sync` (one response).

Runs inside the backend stub only (it imports `triton_python_backend_utils`). It is glue: config.pbtxt
parameters -> `load_artifacts` after the manifest check; each request -> `protocol.prepare` -> the
`Scheduler`, whose updates become Triton responses sent from the scheduler thread. `execute` never blocks on
generation, so requests arrive while others decode and join the running batch; nor on images, which the
scheduler's image worker decodes and encodes (a request with images is only checked here).
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from ..errors import NLDError, out_of_memory, out_of_memory_error
from ..kv.layout import DEFAULT_PAGE_SIZE
from .backend import Scheduler, Update, load_artifacts
from .manifest import verify_manifest
from .package import COMPILE_CHOICES
from .protocol import INPUTS, Limits, Prepared, gather, prepare

log = logging.getLogger("nld_trt.serving")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonLogHandler(logging.Handler):
    """Our log lines in Triton's log, at Triton's levels."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = self.format(record)
        logger = pb_utils.Logger
        if record.levelno >= logging.ERROR:
            logger.log_error(msg)
        elif record.levelno >= logging.WARNING:
            logger.log_warn(msg)
        else:
            logger.log_info(msg)


def triton_error(message: str) -> Any:
    try:
        return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    except (AttributeError, TypeError):  # older backends: no error codes
        return pb_utils.TritonError(message)


def _forget_frames(error: BaseException) -> None:
    """Drop the locals of the frames an error passed through. A caught-and-re-raised exception leaves a
    frame <-> exception cycle whose `f_back` is `execute`'s frame, which holds the Triton requests: until
    the garbage collector happens to run, Triton cannot release them, and unloading the model (server
    shutdown) waits until the exit timeout."""
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__context__


def _strings(*values: str) -> np.ndarray:
    return np.array([[v.encode("utf-8") for v in values]], dtype=np.object_)


def _text(value: str) -> np.ndarray:
    """text_output as TensorRT-LLM's models send it: shape [1] (its clients read output[0].decode())."""
    return np.array([value.encode("utf-8")], dtype=np.object_)


class TritonSink:
    """One request's response sender, as the scheduler's Sink.

    Builds only the outputs the client asked for (all when it named none): each tensor is built while
    holding the GIL, which the decoding thread then waits for, so a client that reads text_output alone
    costs a streamed response one tensor."""

    def __init__(self, sender: Any, prepared: Prepared | None = None, requested: Any = None) -> None:
        self.sender = sender
        self.prepared = prepared
        self.requested = set(requested or ()) or None

    def tensors(self, u: Update) -> list[Any]:
        p = self.prepared
        out: list[Any] = []

        def add(name: str, make: Callable[[], np.ndarray]) -> None:
            if self.requested is None or name in self.requested:
                out.append(pb_utils.Tensor(name, make()))

        add("text_output", lambda: _text(u.text))
        add("output_ids", lambda: np.array([u.token_ids], dtype=np.int32).reshape(1, -1))
        add("num_tokens", lambda: np.array([[u.num_tokens]], dtype=np.int32))
        add("nfe", lambda: np.array([[u.nfe]], dtype=np.int32))
        add("tpf", lambda: np.array([[u.tpf]], dtype=np.float32))
        add("sequence_index", lambda: np.array([[u.sequence_index]], dtype=np.int32))
        add("batch_index", lambda: np.zeros((1, 1), dtype=np.int32))
        if u.finished:
            add("finish_reason", lambda: _strings(u.finish_reason))
            add("stats", lambda: _strings(json.dumps(u.stats)))
        if u.logprobs is not None:
            add("output_log_probs", lambda: np.array([e["logprob"] for e in u.logprobs], dtype=np.float32).reshape(1, 1, -1))
            add("cum_log_probs", lambda: np.array([[u.cum_logprob]], dtype=np.float32))
            add("logprobs", lambda: _strings(json.dumps(u.logprobs)))
        if u.prompt_logprobs is not None:
            add("prompt_logprobs", lambda: _strings(json.dumps(u.prompt_logprobs)))
        if p is not None and p.separate_reasoning:
            add("reasoning_output", lambda: _text(u.reasoning))
        if p is not None and p.send_counts:
            add("num_input_tokens", lambda: np.array([[u.num_input_tokens]], dtype=np.int32))
            add("num_output_tokens", lambda: np.array([[u.num_tokens]], dtype=np.int32))
        return out

    def send(self, u: Update) -> bool:
        self.sender.send(pb_utils.InferenceResponse(output_tensors=self.tensors(u)), flags=FINAL if u.final else 0)
        return True

    def error(self, message: str) -> None:
        self.sender.send(pb_utils.InferenceResponse(error=triton_error(message)), flags=FINAL)

    def cancelled(self) -> bool:
        return bool(self.sender.is_cancelled())

    def close_cancelled(self) -> None:
        # the bare final flag: nobody is left to read an error, Triton just needs the request completed
        self.sender.send(flags=FINAL)


class TritonEventSink:
    """A KV-event subscription's response sender (serving/kv_events.py): one response per batch of events, each
    with the `kv_events` output only."""

    def __init__(self, sender: Any) -> None:
        self.sender = sender

    def send_events(self, text: str) -> bool:
        self.sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("kv_events", _strings(text))]))
        return True

    def cancelled(self) -> bool:
        return bool(self.sender.is_cancelled())

    def close(self) -> None:
        self.sender.send(flags=FINAL)


def _wants_kv_events(request: Any) -> bool:
    tensor = pb_utils.get_input_tensor_by_name(request, "kv_events")
    return tensor is not None and bool(tensor.as_numpy().reshape(-1)[:1].any())


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        """Load the model; a bad repository, or one too big for the memory, fails the load with our message.
        The backend stub appends the frames of the exception that leaves `initialize` ("At: file(line):
        function", pybind11's error_already_set), so the error is raised afresh here: the frames below
        (manifest.py, the loaders) stay out of Triton's load error, only this entry point remains."""
        try:
            self._load(args)
        except NLDError as e:
            raise type(e)(str(e)) from None
        except Exception as e:
            if not out_of_memory(e):
                raise
            raise out_of_memory_error(e, "Package the repository for less at once: a smaller --max-batch, "
                                         "--max-seq-len or --kv-cache-tokens / --kv-cache-gb (the model's "
                                         "max_batch, max_seq_len, kv_cache_tokens and kv_cache_gb parameters), or "
                                         "a quantized checkpoint.") from None

    def _load(self, args: dict[str, str]) -> None:
        if not log.handlers:
            log.addHandler(TritonLogHandler())
            log.setLevel(logging.INFO)
            log.propagate = False
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.name = config["name"]
        streaming = pb_utils.using_decoupled_model_transaction_policy(config)
        model_dir = Path(args["model_repository"])
        artifacts, manifest = verify_manifest((model_dir / params["manifest"]).resolve())
        device = params.get("device") or "cpu"
        if device == "cuda" and args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        threads = int(params.get("torch_threads") or 0)
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self.nld = load_artifacts(
            artifacts,
            kind=manifest.get("kind", "checkpoint"),
            device=device,
            dtype=params.get("dtype") or None,
            max_batch=int(params["max_batch"]),
            max_seq_len=int(params["max_seq_len"]),
            max_block_length=int(params["max_block_length"]),
            kv_cache_tokens=int(params.get("kv_cache_tokens") or 0) or None,
            kv_cache_gb=float(params.get("kv_cache_gb") or 0) or None,
            page_size=int(params.get("page_size") or DEFAULT_PAGE_SIZE),
            prefix_cache=params.get("prefix_cache", "true") == "true",
            lora=params.get("lora", "true") == "true",
            calibration_dir=(model_dir / params["calibration_dir"]).resolve() if params.get("calibration_dir") else None,
            compile=COMPILE_CHOICES.get(params.get("compile") or "auto"),
        )
        self.limits = Limits(
            max_tokens_cap=int(params["max_tokens_cap"]),
            default_max_tokens=int(params["default_max_tokens"]),
            streaming=streaming,
            max_prompt_bytes=int(params.get("max_prompt_bytes") or 65536),
            max_sequences=self.nld.executor.max_batch,
            exclude_input_default=params.get("exclude_input_in_output", "true") == "true",
            default_mode=params.get("default_mode") or "ar",
            **{k: int(params[p]) for k, p in (("max_image_bytes", "max_image_bytes"), ("max_image_pixels",
               "max_image_pixels"), ("max_images", "max_images_per_request")) if params.get(p)},
        )
        self.nld.prompts.limit_images(self.limits.max_image_bytes, self.limits.max_image_pixels)
        self._metrics(args.get("model_instance_name", self.name))
        start = time.perf_counter()
        self.nld.planner.cost = self.nld.calibrate(progress=log.info)  # the scheduler reuses it
        log.info(f"{self.name}: pass-cost model for mode auto {'measured' if self.nld.calibration_measured else 'loaded'} "
                 f"in {time.perf_counter() - start:.1f} s ({self.nld.calibration_file})")
        self.scheduler = Scheduler(self.nld, on_occupancy=self._occupancy, on_mix=self._mix,
                                   image_workers=int(params.get("image_workers") or 1),
                                   publish_kv_events=params.get("kv_events", "true") == "true")
        self._occupancy(self.scheduler.occupancy())
        layout = self.nld.executor.layout
        log.info(
            f"{self.name}: {artifacts.name} loaded ({'streaming' if streaming else 'one response per request'}, "
            f"up to {self.nld.executor.max_batch} sequences of up to {self.nld.executor.max_seq_len} positions in a "
            f"KV cache of {layout.describe()}, prefix cache {'on' if self.nld.pages.prefix_cache else 'off'}, "
            f"KV events {'published' if self.scheduler.kv_events is not None else 'off'}, "
            f"max_tokens cap {self.limits.max_tokens_cap}, {len(manifest['files'])} artifacts verified)"
        )

    # name, kind, help, Occupancy field (gauges show it, counters add its increase)
    METRICS = (
        ("nld_kv_slots_in_use", "gauge", "sequences decoding (each holds its KV pages)", "sequences"),
        ("nld_kv_slots_total", "gauge", "sequences the model instance decodes at once at most (max_batch)",
         "max_sequences"),
        ("nld_requests_waiting", "gauge", "sequences waiting for KV pages (new or preempted)", "waiting"),
        ("nld_kv_pages_used", "gauge", "KV-cache pages held by sequences", "pages_used"),
        ("nld_kv_pages_free", "gauge", "KV-cache pages a sequence can take now (free, or cached and unreferenced)",
         "pages_free"),
        ("nld_kv_pages_cached", "gauge", "KV-cache pages in the prefix index", "pages_cached"),
        ("nld_kv_pages_total", "gauge", "KV-cache pages of the model instance", "pages_total"),
        ("nld_prefix_cache_queries_total", "counter", "prompt tokens looked up in the prefix cache", "prefix_queries"),
        ("nld_prefix_cache_hits_total", "counter", "prompt tokens found in the prefix cache (not computed)",
         "prefix_hits"),
        ("nld_preemptions_total", "counter", "sequences that gave their KV pages back for older ones and waited",
         "preemptions"),
    )

    def _metrics(self, instance: str) -> None:
        """Prometheus metrics on Triton's metrics port: sequences, the waiting queue, KV pages, the prefix
        cache, preemptions, and auto's steps per option."""
        self._families = []
        self._gauges: dict[str, tuple[Any, str, str]] = {}
        self._counted: dict[str, int] = {}
        labels = self._labels = {"model": self.name, "instance": instance}
        self._mix_metrics: dict[str, Any] = {}
        try:
            self._mix_family = pb_utils.MetricFamily(name="nld_auto_steps_total", kind=pb_utils.MetricFamily.COUNTER,
                                                     description="steps mode auto planned, per option")
            self._families.append(self._mix_family)
        except Exception as e:  # metrics disabled on this server
            log.warning(f"metric nld_auto_steps_total unavailable: {e}")
            self._mix_family = None
        for name, kind, doc, key in self.METRICS:
            try:
                family = pb_utils.MetricFamily(
                    name=name, description=doc,
                    kind=pb_utils.MetricFamily.GAUGE if kind == "gauge" else pb_utils.MetricFamily.COUNTER)
                self._families.append(family)
                self._gauges[name] = (family.Metric(labels=labels), kind, key)
            except Exception as e:  # metrics disabled on this server: the stats output still reports it
                log.warning(f"metric {name} unavailable: {e}")

    def _mix(self, delta: dict[str, int]) -> None:
        """Steps mode auto planned, per option (ar, linear_spec/B, dlm/B)."""
        if self._mix_family is None:
            return
        for option, n in delta.items():
            if option not in self._mix_metrics:
                self._mix_metrics[option] = self._mix_family.Metric(labels={**self._labels, "option": option})
            self._mix_metrics[option].increment(n)

    def _occupancy(self, now: Any) -> None:
        for name, (metric, kind, key) in self._gauges.items():
            value = getattr(now, key)
            if kind == "gauge":
                metric.set(value)
            elif value > self._counted.get(name, 0):
                metric.increment(value - self._counted.get(name, 0))
                self._counted[name] = value

    def execute(self, requests: list[Any]) -> None:
        """Validate each request and hand it to the scheduler; answer bad ones at once with the reason."""
        for request in requests:
            if _wants_kv_events(request):
                self._subscribe(request)
                continue
            sink = TritonSink(request.get_response_sender(), requested=request.requested_output_names())
            try:
                inputs = {}
                for spec in INPUTS:
                    tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
                    inputs[spec.name] = None if tensor is None else tensor.as_numpy()
                prepared = prepare(self.nld, gather(inputs, request.parameters()), self.limits, defer_images=True)
                sink.prepared = prepared
            except NLDError as e:
                _forget_frames(e)
                sink.error(str(e))
                continue
            except Exception as e:  # noqa: BLE001 - a malformed request must not take the model down
                log.exception("could not read a request")
                _forget_frames(e)
                sink.error(f"could not read the request ({type(e).__name__}: {e})")
                continue
            self.scheduler.submit(prepared, sink)
        return None

    def _subscribe(self, request: Any) -> None:
        """A KV-event subscription: the prefix cache's changes streamed until the client leaves."""
        sink = TritonSink(request.get_response_sender())
        if not self.limits.streaming:
            sink.error("kv_events needs the decoupled model `nld` (a gRPC stream)")
            return
        try:
            self.scheduler.subscribe_kv_events(TritonEventSink(sink.sender))
        except NLDError as e:
            sink.error(str(e))

    def finalize(self) -> None:
        self.scheduler.stop()
        log.info(f"{self.name}: scheduler stopped, unloading")
        self._gauges.clear()
        self._families.clear()
