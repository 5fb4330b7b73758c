"""The deployment's KV events, relayed from its `nld` model to Dynamo's KV router.

The worker subscribes to the model's KV events over gRPC (serving/kv_events.py: a first response with the cache
as it is, then what changes) and publishes them with Dynamo's `KvEventPublisher` in its push form:
`publish_stored(token_ids, num_block_tokens, block_hashes, parent_hash)` per chain of new full pages and
`publish_removed(block_hashes)`. The router hashes each block's tokens itself and uses our hashes only as the
pages' identities (parent links, removals), so they travel as they are, as signed 64-bit ints. The block size
registered with Dynamo is the model's page size. The publisher keeps a local indexer: a router that starts (or
restarts) after the worker asks it for the pages instead of missing them.

Pages whose hash covers extra keys (an image in the prompt) are not published, nor their descendants: a router
that sees only token ids cannot tell two images apart, and no text prompt reaches those pages anyway.

The stream ends when the tritonserver restarts or the connection drops: the relay subscribes again, and the new
first response starts with `cleared`, so the router drops what this worker published before and gets the cache
anew.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from .. import kv_events
from ..openai.triton import TritonBridge, outputs

log = logging.getLogger("nld_trt.dynamo")

RESUBSCRIBE_S = 1.0


class NoKVEvents(Exception):
    """The served model has no prefix cache, does not publish its KV events (--no-kv-events) or predates them:
    nothing to relay."""


def signed64(h: int) -> int:
    """An unsigned 64-bit hash as the signed 64-bit int Dynamo's publisher takes."""
    return h - (1 << 64) if h >= 1 << 63 else h


class KVPublisher:
    """Turns wire events into Dynamo publisher calls, remembering what it published (for removals and clears)."""

    def __init__(self, publisher: Any, page_size: int) -> None:
        self.publisher, self.page_size = publisher, page_size
        self.published: set[int] = set()
        self.skipped: set[int] = set()

    def apply(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            if event["type"] == "cleared":
                if self.published:
                    self.publisher.publish_removed([signed64(h) for h in self.published])
                self.published.clear()
                self.skipped.clear()
            elif event["type"] == "removed":
                gone = [h for h in event["hashes"] if h in self.published]
                self.published.difference_update(gone)
                self.skipped.difference_update(event["hashes"])
                if gone:
                    self.publisher.publish_removed([signed64(h) for h in gone])
            else:
                if event["page_size"] != self.page_size:
                    log.error("KV events with page size %s, registered %s: not published", event["page_size"],
                              self.page_size)
                    continue
                for run in self.runs(event["pages"]):
                    self.publish_run(run)

    def runs(self, pages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Consecutive pages that chain (each the parent of the next); a page with extra keys, or below one,
        is left out."""
        out: list[list[dict[str, Any]]] = []
        for page in pages:
            if page["extra"] or page["parent"] in self.skipped:
                self.skipped.add(page["hash"])
                continue
            if page["hash"] in self.published:
                continue
            if out and out[-1][-1]["hash"] == page["parent"]:
                out[-1].append(page)
            else:
                out.append([page])
        return out

    def publish_run(self, run: list[dict[str, Any]]) -> None:
        parent = run[0]["parent"]
        if parent is not None and parent not in self.published:
            log.debug("a chain of %d pages starts below a page this worker never published: left out", len(run))
            return
        self.publisher.publish_stored(
            token_ids=[t for page in run for t in page["tokens"]], num_block_tokens=[self.page_size] * len(run),
            block_hashes=[signed64(page["hash"]) for page in run],
            parent_hash=None if parent is None else signed64(parent))
        self.published.update(page["hash"] for page in run)


async def subscribe(bridge: TritonBridge) -> AsyncIterator[list[dict[str, Any]]]:
    """The model's KV events, one list per response, until the stream ends (then it returns) or fails (raises)."""
    info = await bridge.info()
    inputs = bridge.tensors(info, {"kv_events": True, "stream": True})

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": bridge.model, "inputs": inputs}

    call = bridge.client().stream_infer(requests())
    try:
        async for result, error in call:
            if error is not None:
                if any(reason in error.message() for reason in kv_events.NO_EVENTS):
                    raise NoKVEvents(error.message())
                raise RuntimeError(f"the model refused the KV-event subscription: {error.message()}")
            raw = outputs(result).get("kv_events")
            if raw:
                yield kv_events.decode(raw[0])
    finally:
        call.cancel()


async def relay_kv_events(bridge: TritonBridge, endpoint: Any, page_size: int, stopping: asyncio.Event) -> None:
    """Relay the deployment's KV events to Dynamo until the worker stops."""
    from dynamo.llm import KvEventPublisher

    info = await bridge.info()
    if not info.has("kv_events"):
        log.warning("the served model %r reports no KV events (packaged by an nld-trt without them): Dynamo's KV router "
                    "will balance this worker by load only", bridge.model)
        return
    publisher = KVPublisher(KvEventPublisher(endpoint, kv_block_size=page_size, enable_local_indexer=True), page_size)
    while not stopping.is_set():
        try:
            async for events in subscribe(bridge):
                publisher.apply(events)
        except asyncio.CancelledError:
            raise
        except NoKVEvents as e:
            log.warning("%s: Dynamo's KV router will balance this worker by load only", e)
            return
        except Exception as e:  # noqa: BLE001 - the stream failed (tritonserver restarting): subscribe again
            log.warning("KV-event stream from %s ended (%s): subscribing again", bridge.url, e)
        await asyncio.sleep(RESUBSCRIBE_S)
