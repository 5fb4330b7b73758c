"""What the Triton model runs, independent of Triton: load the artifacts, schedule requests continuously.

`load_artifacts` is the one place a model repository's artifacts become an `NLD`: a checkpoint runs on the
PyTorch executor; an engine directory (`nld-trt package --engine`) on the TensorRT executor on a GPU and the
ONNX Runtime executor on CPU, without touching the scheduler or the Triton glue.

`Scheduler` owns one `Batcher` and a thread that steps it while there is work. Requests join and leave
between steps (any mix of modes in one batch; admission by free KV pages, prefixes reused from the prefix
cache, preemption when pages run out: nld_trt/decoding/driver.py); after each step every streaming request
gets the tokens it committed (dlm and linear_spec commit several per step) as a text delta. A request whose
client went away is cancelled, which frees its KV pages at the next step. One bad request, or even a failing
step, never stops the thread: the affected requests get an error and the rest carry on.

A request with images is not admitted until its images are ready: an image worker thread (`image_workers`)
decodes and prepares them (nld_trt/vision/processor.py), builds the prompt and runs the vision tower and
projector (nld_trt/vision/encoder.py, cached by content digest), while the scheduler thread keeps stepping the
batch; only then does the request join the batch, whose prefill finds its image rows ready. So a large image
delays its own request, not the others' steps (torch releases the GIL inside its ops; the Python between them
is what the two threads share). `image_workers=0` keeps the single-thread behaviour: the images are encoded
in the request's prefill, on the scheduler thread.

The prefix cache's KV events (pages stored and evicted, nld_trt/kv/events.py) go to a `kv_events.Hub` that
streams them to subscribers (the Dynamo worker's KV router relay), in order with each step's responses.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..decoding import SEQUENCE_TYPES, Batcher, Sequence
from ..decoding.sequence import TokenLogprob
from ..errors import CheckpointError, NLDError
from ..runtime import NLD, load
from . import kv_events
from .protocol import Prepared

log = logging.getLogger("nld_trt.serving")

CANCEL_CHECK_S = 0.02  # how often clients are polled for cancellation (an IPC round trip each)


def load_artifacts(directory: Path, kind: str = "checkpoint", **options: Any) -> NLD:
    """The served model from a repository's artifact directory. options: `nld_trt.load` keywords."""
    from ..engine.loader import is_engine_dir

    if kind not in ("checkpoint", "engine"):
        raise CheckpointError(f"artifact kind {kind!r} is not supported by this nld-trt: upgrade it or re-package")
    if (kind == "engine") != is_engine_dir(directory):
        raise CheckpointError(f"the manifest's artifact kind {kind!r} does not match {directory}: re-package it")
    return load(directory, **options)


class Sink(Protocol):
    """Where one request's responses go (a Triton response sender in production, a list in tests)."""

    def send(self, update: Update) -> bool:
        """Deliver one response; False if the client is gone."""

    def error(self, message: str) -> None: ...

    def cancelled(self) -> bool: ...

    def close_cancelled(self) -> None:
        """Complete a cancelled request (Triton releases a request only after its final flag)."""


@dataclass(frozen=True)
class Occupancy:
    """What the gauges and counters show: sequences decoding (`slots` in the names from before pages: one per
    sequence), requests waiting, KV pages, prefix-cache queries and hits (tokens), preemptions."""

    sequences: int
    max_sequences: int
    waiting: int
    pages_used: int  # referenced by sequences
    pages_cached: int  # in the prefix index (referenced or not)
    pages_free: int  # takeable now: free, or cached and unreferenced (evicted on demand)
    pages_total: int
    prefix_queries: int  # prompt tokens looked up in the prefix cache, since load
    prefix_hits: int  # of which found
    preemptions: int  # since load


@dataclass
class Update:
    text: str  # the new text (streaming: the delta since the last update); the answer only with reasoning split
    token_ids: list[int]
    num_tokens: int
    nfe: int
    tpf: float
    final: bool  # the request's last response (Triton's final flag)
    finished: bool = False  # this sequence's last response
    sequence_index: int = 0
    finish_reason: str = ""
    stats: dict[str, Any] | None = None
    reasoning: str = ""  # with separate_reasoning: the new thinking text
    logprobs: list[dict[str, Any]] | None = None  # with return_log_probs: one entry per token in token_ids
    cum_logprob: float = 0.0
    num_input_tokens: int = 0
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # each sequence's first response, with prompt_logprobs


@dataclass
class Stream:
    """What one sequence of a request has sent so far."""

    seq: Sequence
    index: int
    tokens: int = 0
    reasoning: str = ""
    content: str = ""
    cum_logprob: float = 0.0
    finished: bool = False
    prompt_sent: bool = False


@dataclass
class Job:
    prepared: Prepared
    sink: Sink
    streams: list[Stream] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    failed: bool = False  # answered with an error: nothing more is sent
    # Its final response went out: its Triton response factory is gone, so nothing may call its sender again
    # (tritonserver 2.51 crashes on is_cancelled after the final response). Sends and polls hold the lock.
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    images: Any = None  # its prompt's images bound to the vision encoder (rows ready when an image worker made them)

    @property
    def done(self) -> bool:
        return all(st.finished for st in self.streams)


class Delta:
    """A streamed, not final, response of one sequence: queued as itself so that the sender can merge it
    with the next ones of the same sequence (`coalesce`)."""

    def __init__(self, scheduler: Scheduler, job: Job, update: Update) -> None:
        self.scheduler, self.job, self.update = scheduler, job, update

    @property
    def key(self) -> tuple[int, int]:
        return id(self.job), self.update.sequence_index

    def merge(self, later: Update) -> None:
        u = self.update
        u.text += later.text
        u.reasoning += later.reasoning
        u.token_ids = u.token_ids + later.token_ids
        if u.logprobs is not None:
            u.logprobs = u.logprobs + (later.logprobs or [])
        u.num_tokens, u.nfe, u.tpf, u.cum_logprob = later.num_tokens, later.nfe, later.tpf, later.cum_logprob

    def __call__(self) -> None:
        with self.job.lock:
            if self.job.closed:
                return
            sent = self.scheduler._safe(lambda: self.job.sink.send(self.update), False)
        if sent is False:
            for st in self.job.streams:
                self.scheduler.batcher.cancel(st.seq)


def coalesce(batch: list[Callable[[], Any]]) -> list[Callable[[], Any]]:
    """Queued deliveries in order, each sequence's waiting deltas merged into its first one (a sequence's
    last response, an error or a gauge update is never merged; nothing of a sequence is sent after its last
    response, so merging forward keeps every sequence's order)."""
    out: list[Callable[[], Any]] = []
    open_deltas: dict[tuple[int, int], Delta] = {}
    for item in batch:
        if isinstance(item, Delta):
            first = open_deltas.get(item.key)
            if first is not None:
                first.merge(item.update)
                continue
            open_deltas[item.key] = item
        out.append(item)
    return out


LOGPROB_FLOOR = -9999.0  # what a zero probability is sent as (JSON has no -inf; the OpenAI API's value)


class Scheduler:
    """Continuous batching over one model for requests arriving from any thread (`submit`)."""

    def __init__(self, nld: NLD, on_occupancy: Callable[[Occupancy], None] | None = None,
                 on_mix: Callable[[dict[str, int]], None] | None = None, image_workers: int = 1,
                 publish_kv_events: bool = True) -> None:
        self.nld = nld
        self.planner = nld.planner
        self.planner.model  # auto's pass-cost model: loaded, or measured now before any request takes pages
        self.batcher = Batcher(nld.executor, planner=self.planner, pages=nld.pages)
        self.on_occupancy = on_occupancy
        self.on_mix = on_mix  # steps auto planned per option since the last call
        self._mix_reported: dict[str, int] = {}
        self.cancelled_total = 0
        self._inbox: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}
        self._wake = threading.Event()
        self._stop = False
        self._reported: Occupancy | None = None
        self._outbox: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        # requests whose images are being prepared: not in the inbox yet
        self._images = ThreadPoolExecutor(image_workers, "nld-images") if image_workers > 0 else None
        self._preparing_jobs: dict[int, Job] = {}
        self._closing = False
        self._entry = threading.Lock()  # orders `_closing` with the inbox puts
        # the prefix cache's KV events (nld.pages.on_event), for subscribers (serving/kv_events.py); a model whose
        # prefix cache is off has none, nor one whose deployment does not publish them
        self.kv_events: kv_events.Hub | None = None
        if nld.pages.prefix_cache and publish_kv_events:
            self.kv_events = kv_events.Hub()
            nld.pages.on_event = self.kv_events.on_event
            if nld.pages.cached:  # the hub knows only what it heard: start it and the index equal (both empty)
                nld.pages.clear()
        self._sender = threading.Thread(target=self._send_loop, name="nld-sender", daemon=True)
        self._thread = threading.Thread(target=self._loop, name="nld-scheduler", daemon=True)
        self._watcher = threading.Thread(target=self._watch_loop, name="nld-cancel-watch", daemon=True)
        self._sender.start()
        self._thread.start()
        self._watcher.start()

    # from any thread ------------------------------------------------------------------------------
    def submit(self, prepared: Prepared, sink: Sink) -> None:
        """Queue a request; one with images (`prepared.deferred`) first goes to the image worker."""
        job = Job(prepared, sink)
        if prepared.deferred is None:
            self._enqueue(job)
        elif self._images is None:  # single-thread mode: prepared here, its tower runs at admission
            self._prepare_images(job, encode=False)
        else:
            with self._entry:  # a request arriving while the model unloads is answered, never lost
                if not self._closing:
                    self._preparing_jobs[id(job)] = job
                    self._images.submit(self._prepare_images, job)
                    return
            self._post(job, lambda sink: sink.error("the model is being unloaded"), final=True)

    @property
    def preparing(self) -> int:
        """Requests whose images are being decoded and encoded (not yet waiting for a KV slot)."""
        return len(self._preparing_jobs)

    def subscribe_kv_events(self, sink: Any) -> None:
        """Stream the prefix cache's KV events to `sink` (send_events, cancelled, close), starting with the index as
        it is (taken on the scheduler thread, in order with the events that follow)."""
        if self.kv_events is None:
            raise NLDError(kv_events.NOT_PUBLISHED if self.nld.pages.prefix_cache else kv_events.NO_PREFIX_CACHE)
        self._inbox.put(sink)
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Answer what is in flight with an error, send everything queued, end the threads."""
        with self._entry:
            self._closing = True
        if self._images is not None:
            self._images.shutdown(wait=True, cancel_futures=True)
            for job in list(self._preparing_jobs.values()):  # never started: answered here
                self._post(job, lambda sink: sink.error("the model is being unloaded"), final=True)
            self._preparing_jobs.clear()
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        if self.kv_events is not None:
            if self.nld.pages.on_event == self.kv_events.on_event:
                self.nld.pages.on_event = None
            self._outbox.put(self.kv_events.close_all)
        self._outbox.put(None)
        self._sender.join(timeout)
        self._watcher.join(timeout)

    @property
    def slots_total(self) -> int:
        """The most sequences decoding at once (max_batch)."""
        return self.nld.executor.max_batch

    @property
    def slots_in_use(self) -> int:
        """Sequences decoding now (each holds its KV pages; waiting and preempted ones hold none)."""
        return len(self.batcher.active)

    def occupancy(self) -> Occupancy:
        pages = self.nld.pages
        return Occupancy(len(self.batcher.active), self.slots_total, len(self.batcher.waiting), pages.in_use,
                         pages.cached, pages.available, pages.total, pages.stats.queries, pages.stats.hits,
                         pages.stats.preemptions)

    # the image worker -----------------------------------------------------------------------------
    def _prepare_images(self, job: Job, encode: bool = True) -> None:
        """Decode and prepare a request's images and build its prompt (`prepared.deferred`), then run the vision
        encoder on them (`encode`), then queue it for admission. A bad image fails its request alone."""
        try:
            if self._client_gone(job):
                return
            job.prepared = job.prepared.deferred()
            job.images = self.nld.bind_images(job.prepared.prompt)
            if encode and job.images is not None:
                job.images.rows()
        except NLDError as e:
            message = str(e)
            self._post(job, lambda sink: sink.error(message), final=True)
            return
        except Exception as e:  # noqa: BLE001 - a bug or a device error: this request fails, the model serves on
            log.error("could not prepare a request's images:\n%s", traceback.format_exc())
            message = f"could not prepare the request's images ({type(e).__name__}: {e}): retry the request"
            self._post(job, lambda sink: sink.error(message), final=True)
            return
        finally:
            self._preparing_jobs.pop(id(job), None)
        if not self._client_gone(job):
            self._enqueue(job)

    def _client_gone(self, job: Job) -> bool:
        """A request whose client left before it joined the batch: completed as cancelled, never admitted."""
        with job.lock:
            gone = not job.closed and self._safe(job.sink.cancelled, False)
        if gone:
            self.cancelled_total += 1
            log.info("request cancelled by its client while its images were prepared")
            self._post(job, lambda sink: sink.close_cancelled(), final=True)
        return gone

    def _enqueue(self, job: Job) -> None:
        with self._entry:
            if not self._closing:
                self._inbox.put(job)
                self._wake.set()
                return
        self._post(job, lambda sink: sink.error("the model is being unloaded"), final=True)

    # the sender and watcher threads ---------------------------------------------------------------
    # Each call into a Triton response sender (send, is_cancelled, a gauge update) is an IPC round trip to
    # the server process: none runs on the scheduler thread, so they overlap decoding instead of delaying it.
    def _send_loop(self) -> None:
        """Responses (and gauge updates) go out in order. When the sender falls behind (each send is an IPC
        round trip), the streamed deltas of one sequence waiting in the queue go out as one response."""
        while (first := self._outbox.get()) is not None:
            batch, done = [first], False
            while True:
                try:
                    item = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    done = True
                    break
                batch.append(item)
            for deliver in coalesce(batch):
                self._safe(deliver, None)
            if done:
                return

    def _watch_loop(self) -> None:
        """Poll the clients of the requests in flight for cancellation; a cancelled one leaves the batch at
        the next step (Batcher.cancel only sets a flag)."""
        while not self._stop:
            time.sleep(CANCEL_CHECK_S)
            for job in {id(j): j for j in list(self._jobs.values())}.values():
                with job.lock:  # never after the final response (see Job.closed)
                    cancelled = not job.closed and not job.done and self._safe(job.sink.cancelled, True)
                if cancelled:
                    for st in job.streams:
                        self.batcher.cancel(st.seq)
            if self.kv_events is not None:
                self.kv_events.watch()

    def _post(self, job: Job, action: Callable[[Sink], Any], final: bool = False) -> None:
        """Queue one response (`final`: the request's last); a stream whose client is gone (send False or
        raising) gets cancelled."""

        def deliver() -> None:
            with job.lock:
                if job.closed:
                    return
                sent = self._safe(lambda: action(job.sink), False)
                job.closed = final
            if sent is False:
                for st in job.streams:
                    self.batcher.cancel(st.seq)

        self._outbox.put(deliver)

    # the scheduler thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            try:
                self._tick()
            except Exception as e:  # a bug or a device error: fail what is in flight, keep serving
                log.error("decoding loop failed:\n%s", traceback.format_exc())
                self._fail_all(f"internal error in the decoding loop ({type(e).__name__}: {e}): retry the request")
        self._fail_all("the model is being unloaded")

    def _tick(self) -> None:
        """Admit new requests, drop cancelled ones, run one step, send what it produced."""
        self._admit()
        if self.batcher.idle:
            self._wake.wait(1.0)
            self._wake.clear()
            return
        left = self.batcher.step()
        self._report()  # before any response goes out: a client that got its answer sees the gauges updated
        self._flush_kv_events()
        for seq in self.batcher.active:
            self._progress(self._jobs[id(seq)], seq)
        for seq in left:
            self._finish(self._jobs.pop(id(seq)), seq)

    def _admit(self) -> None:
        """Turn queued requests into sequences. Building one can fail (a bug, an odd value that got
        through): then that request alone is answered with the error."""
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not isinstance(job, Job):  # a KV-event subscription
                for deliver in self.kv_events.subscribe(job):
                    self._outbox.put(deliver)
                continue
            p = job.prepared
            try:
                seq_type = SEQUENCE_TYPES[p.params.mode]
                images = job.images or (None if p.prompt is None else self.nld.bind_images(p.prompt))
                job.streams = [Stream(seq_type(p.prompt_ids, p.params, self.nld.config, seed, self.nld.tokenizer.decode,
                                               images=images), i)
                               for i, seed in enumerate(p.seeds or [p.params.seed])]
            except Exception as e:  # noqa: BLE001 - one bad request must not reach the batch
                log.error("could not start a request:\n%s", traceback.format_exc())
                message = f"could not start the request ({type(e).__name__}: {e})"
                self._post(job, lambda sink: sink.error(message), final=True)
                continue
            for st in job.streams:
                self._jobs[id(st.seq)] = job
                self.batcher.submit(st.seq)

    def _flush_kv_events(self) -> None:
        """What the step changed in the prefix cache, to the subscribers (before the responses of the step)."""
        if self.kv_events is not None:
            for deliver in self.kv_events.flush():
                self._outbox.put(deliver)

    def _stream_of(self, job: Job, seq: Sequence) -> Stream:
        return next(st for st in job.streams if st.seq is seq)

    def _progress(self, job: Job, seq: Sequence) -> None:
        """Streaming: send what the sequence committed since the last update, as far as it is releasable
        (complete characters, nothing that might still become a stop string)."""
        st = self._stream_of(job, seq)
        if not job.prepared.stream or len(seq.out) == st.tokens:
            return
        k, text = seq.output.releasable(seq.out)
        if k <= st.tokens:
            return
        self._outbox.put(Delta(self, job, self._update(job, st, k, text, final=False)))

    def _finish(self, job: Job, seq: Sequence) -> None:
        """A sequence left the batch: its last response, or the request's error (once: an error response is
        final, so the request's other sequences stop and send nothing more)."""
        st = self._stream_of(job, seq)
        st.finished = True
        if job.failed:
            return
        if seq.finish_reason == "error":
            job.failed = True
            for other in job.streams:
                self.batcher.cancel(other.seq)
            message = f"the request failed while decoding ({seq.error}): retry it"
            self._post(job, lambda sink: sink.error(message), final=True)
            return
        if seq.finish_reason == "cancelled":
            self.cancelled_total += 1
            log.info("request cancelled by its client after %d tokens; KV pages freed", len(seq.out))
            if job.done:
                self._post(job, lambda sink: sink.close_cancelled(), final=True)
            return
        update = self._update(job, st, len(seq.out), seq.text(), final=job.done)
        self._post(job, lambda sink: sink.send(update), final=update.final)

    def _update(self, job: Job, st: Stream, k: int, text: str, final: bool) -> Update:
        """The next response of one sequence: its tokens st.tokens..k and the text they release (`text`
        is the text of out[:k], or the final text), split into thinking and answer when asked."""
        seq, p = st.seq, job.prepared
        finished = seq.done
        stream = p.stream
        reasoning_len = self._reasoning_length(p, seq, k, text)
        reasoning, content = text[:reasoning_len], text[reasoning_len:]
        if not p.separate_reasoning:
            reasoning, content = "", text
        ids = seq.out[st.tokens : k] if stream else seq.out[:k]
        lps = seq.logprobs[st.tokens : k] if stream else seq.logprobs[:k]
        update = Update(
            text=content[len(st.content):] if stream else content,
            reasoning=reasoning[len(st.reasoning):] if stream else reasoning,
            token_ids=ids,
            num_tokens=len(seq.out),
            nfe=seq.stats.nfe,
            tpf=seq.stats.tpf,
            final=final,
            finished=finished,
            sequence_index=st.index,
            num_input_tokens=len(seq.prompt),
        )
        if p.params.logprobs:
            update.logprobs = [self._logprob_entry(lp) for lp in lps]
            st.cum_logprob += sum(max(lp.logprob, LOGPROB_FLOOR) for lp in lps) if stream else 0.0
            update.cum_logprob = st.cum_logprob if stream else sum(max(lp.logprob, LOGPROB_FLOOR) for lp in lps)
        if seq.prompt_logprobs is not None and not st.prompt_sent:
            update.prompt_logprobs = self._prompt_entries(seq)
            st.prompt_sent = True
        if p.echo:  # unary only: TensorRT-LLM's output starts with the prompt unless exclude_input_in_output
            update.text = self.nld.tokenizer.decode(seq.prompt) + update.text
            update.token_ids = seq.prompt + update.token_ids
        st.tokens, st.reasoning, st.content = k, reasoning, content
        if finished:
            update.finish_reason = seq.finish_reason or "length"
            update.stats = {
                **seq.stats.as_dict(),
                "mode": seq.params.mode,
                "finish_reason": update.finish_reason,
                "stop_reason": seq.stop_reason,
                "sequence_index": st.index,
                "prompt_tokens": len(seq.prompt),
                "latency_s": round(time.perf_counter() - job.submitted, 6),
                # after this request's pages were given back: what other requests hold right now
                "slots_in_use": self.slots_in_use,
                "slots_total": self.slots_total,
                "waiting": len(self.batcher.waiting),
                "cancelled_total": self.cancelled_total,
                "kv_pages_used": self.nld.pages.in_use,
                "kv_pages_total": self.nld.pages.total,
            }
        return update

    def _reasoning_length(self, p: Prepared, seq: Sequence, k: int, text: str) -> int:
        """How much of `text` (the text of out[:k]) is thinking: all of it until the end-think token when
        the prompt opened thinking, none otherwise."""
        if not (p.separate_reasoning and p.thinking):
            return 0
        end = self.nld.prompts.thinking[1] if self.nld.prompts.thinking else None
        if end is not None and end in seq.out[:k]:
            return min(len(self.nld.tokenizer.decode(seq.out[: seq.out.index(end)])), len(text))
        return len(text)

    def _token(self, token_id: int, logprob: float | None) -> dict[str, Any]:
        tok = self.nld.tokenizer
        return {"token_id": token_id, "token": tok.token_text(token_id), "bytes": list(tok.token_bytes(token_id)),
                "logprob": None if logprob is None else max(logprob, LOGPROB_FLOOR)}

    def _logprob_entry(self, lp: TokenLogprob) -> dict[str, Any]:
        entry = {**self._token(lp.token_id, lp.logprob), "top_logprobs": [self._token(t, v) for t, v in lp.top]}
        if lp.rank is not None:
            entry["rank"] = lp.rank
        return entry

    def _prompt_entries(self, seq: Sequence) -> list[dict[str, Any]]:
        """Every prompt token: its text and bytes; from the second on its log-probability, rank and alternatives
        (the first has logprob null: nothing precedes it)."""
        first = {**self._token(seq.prompt[0], None), "rank": None, "top_logprobs": []}
        return [first] + [self._logprob_entry(lp) for lp in seq.prompt_logprobs[1:]]

    def _fail_all(self, message: str) -> None:
        """Answer every request in flight or waiting with an error and start over with an empty batch."""
        for job in {id(j): j for j in self._jobs.values()}.values():
            self._post(job, lambda sink: sink.error(message), final=True)
        self.batcher.abort()  # every page held belongs to a request failed here (cached pages stay valid)
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, Job):
                self._post(job, lambda sink: sink.error(message), final=True)
            else:  # a KV-event subscription not yet taken: it ends (its subscriber subscribes again)
                self._outbox.put(job.close)
        self._jobs.clear()
        self.batcher = Batcher(self.nld.executor, planner=self.planner, pages=self.nld.pages)
        self._report()

    def _report(self) -> None:
        """Occupancy to the gauges, only when it changed (each update is an IPC round trip in Triton)."""
        now = self.occupancy()
        if self.on_occupancy is not None and now != self._reported:
            self._reported = now
            self._outbox.put(lambda: self.on_occupancy(now))  # in order with the responses
        mix = self.planner.mix
        if self.on_mix is not None and mix != self._mix_reported:
            delta = {k: v - self._mix_reported.get(k, 0) for k, v in mix.items() if v != self._mix_reported.get(k, 0)}
            self._mix_reported = dict(mix)
            self._outbox.put(lambda: self.on_mix(delta))

    @staticmethod
    def _safe(fn: Callable[[], Any], default: Any) -> Any:
        """Client-facing calls (send, is_cancelled) may fail when a client vanishes: never let them escape."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one client's failure must not stop the others
            log.warning("client call failed: %s", e)
            return default
