"""The prefix cache's KV events on the wire, from the `nld` model to whoever routes by them (the Dynamo worker).

The page manager (nld_trt/kv/pages.py) reports its changes as typed events inside the tritonserver's model
process (nld_trt/kv/events.py). A client subscribes with one request to the decoupled model `nld` carrying
`kv_events=true`; the model answers with a stream of responses, each with a `kv_events` output: a JSON list of
events, in the order the cache changed. The first response describes the cache as it is (a `cleared` event,
then every indexed page, parents first), so a subscriber that connects late, or again after losing the stream,
holds the same index as the cache; the others carry what changed since, one response per scheduler step that
changed something. Why a gRPC stream rather than a socket of the model's own: the subscriber needs nothing but
the tritonserver's gRPC address it already talks to (on another host too), binds nothing, and Triton's own
request cancellation tells the model when a subscriber has left.

Events (`page_size` positions per page; hashes are the page manager's unsigned 64-bit chain hashes):
  {"type": "stored", "page_size": P, "pages": [{"hash": h, "parent": h | null, "tokens": [...], "extra": bool}]}
      pages in chain order (each page's parent is the page before it, or was stored before); `extra`: the
      page's hash also covers extra keys (an image's digest), which a token-only router cannot reproduce
  {"type": "removed", "hashes": [h, ...]}
  {"type": "cleared"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


def encode(events: list[dict[str, Any]]) -> str:
    return json.dumps(events, separators=(",", ":"))


def decode(text: str | bytes) -> list[dict[str, Any]]:
    events = json.loads(text)
    if not isinstance(events, list) or not all(isinstance(e, dict) and e.get("type") in ("stored", "removed", "cleared")
                                               for e in events):
        raise ValueError(f"not a list of KV events: {str(text)[:80]}")
    return events


def wire(event: Any) -> dict[str, Any]:
    """One typed event of the page manager (PagesStored, PagesRemoved, CacheCleared) as its wire form."""
    kind = type(event).__name__
    if kind == "PagesStored":
        return {"type": "stored", "page_size": event.page_size,
                "pages": [{"hash": p.hash, "parent": p.parent_hash, "tokens": list(p.token_ids),
                           "extra": bool(p.extra_keys)} for p in event.pages]}
    if kind == "PagesRemoved":
        return {"type": "removed", "hashes": list(event.hashes)}
    if kind == "CacheCleared":
        return {"type": "cleared"}
    raise TypeError(f"not a KV event: {event!r}")


@dataclass
class IndexMirror:
    """The prefix index as the events describe it (hash -> page), so that a new subscriber gets it whole."""

    page_size: int = 0
    pages: dict[int, dict[str, Any]] = field(default_factory=dict)

    def apply(self, event: dict[str, Any]) -> None:
        if event["type"] == "stored":
            self.page_size = event["page_size"]
            for page in event["pages"]:
                self.pages[page["hash"]] = page
        elif event["type"] == "removed":
            for h in event["hashes"]:
                self.pages.pop(h, None)
        else:
            self.pages.clear()

    def snapshot(self) -> list[dict[str, Any]]:
        """`cleared`, then every page with its ancestors first (a page whose parent is gone is unreachable by any
        lookup, which walks from the root: left out)."""
        ordered: list[dict[str, Any]] = []
        placed: set[int] = set()
        for h in self.pages:
            chain = []
            while h is not None and h not in placed:
                page = self.pages.get(h)
                if page is None:  # an evicted ancestor: this chain is unreachable
                    chain = None
                    break
                chain.append(page)
                h = page["parent"]
            if chain:
                for page in reversed(chain):
                    placed.add(page["hash"])
                    ordered.append(page)
        out: list[dict[str, Any]] = [{"type": "cleared"}]
        if ordered:
            out.append({"type": "stored", "page_size": self.page_size, "pages": ordered})
        return out


NO_PREFIX_CACHE = "this deployment's model has no prefix cache, so it reports no KV events"
NOT_PUBLISHED = ("this deployment does not publish KV events (packaged with --no-kv-events, as a tritonserver that "
                 "untrusted clients reach should be: the events carry every cached page's token ids)")
NO_EVENTS = (NO_PREFIX_CACHE, NOT_PUBLISHED)  # refusals a subscriber takes as "route this worker by load"


class Subscriber:
    """One subscription's response sender (a Triton sender in production): `send` a JSON text, `cancelled`,
    `close` (the final response). Calls are serialized by `lock`; nothing is sent after `close` (tritonserver 2.51
    crashes on a sender polled after its final response)."""

    def __init__(self, sink: Any) -> None:
        import threading

        self.sink, self.lock, self.closed = sink, threading.Lock(), False

    def send(self, text: str) -> bool:
        with self.lock:
            if self.closed:
                return False
            return self.sink.send_events(text) is not False

    def cancelled(self) -> bool:
        with self.lock:
            return not self.closed and bool(self.sink.cancelled())

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.sink.close()


class Hub:
    """The KV events of one model instance and who listens: fed the page manager's events on the scheduler thread,
    it hands back deliveries (callables) for the scheduler's sender thread, so that events and responses go out
    in one order and no call into Triton runs on the decoding thread."""

    def __init__(self) -> None:
        self.mirror = IndexMirror()
        self.pending: list[dict[str, Any]] = []
        self.subscribers: list[Subscriber] = []

    def on_event(self, event: Any) -> None:
        """The page manager's callback (scheduler thread)."""
        item = wire(event)
        self.mirror.apply(item)
        self.pending.append(item)

    def subscribe(self, sink: Any) -> list[Any]:
        """A new subscriber (scheduler thread): the others get what is pending, it gets the index as it is now."""
        deliveries = self.flush()
        sub = Subscriber(sink)
        self.subscribers.append(sub)
        text = encode(self.mirror.snapshot())
        return deliveries + [lambda: sub.send(text)]

    def flush(self) -> list[Any]:
        """The events since the last flush, one response per subscriber (scheduler thread); subscribers that left
        are closed."""
        deliveries: list[Any] = []
        self.flush_into(deliveries)
        return deliveries

    def flush_into(self, deliveries: list[Any]) -> None:
        gone = [s for s in self.subscribers if s.closed]
        for sub in gone:
            self.subscribers.remove(sub)
        if self.pending and self.subscribers:
            text = encode(self.pending)
            deliveries.extend((lambda s=sub: s.send(text)) for sub in self.subscribers)
        self.pending = []

    def watch(self) -> None:
        """Close the subscriptions whose client left (watcher thread)."""
        for sub in list(self.subscribers):
            try:
                if sub.cancelled():
                    sub.close()
            except Exception:  # noqa: BLE001 - a vanished client: nothing left to close
                sub.closed = True

    def close_all(self) -> None:
        for sub in list(self.subscribers):
            try:
                sub.close()
            except Exception:  # noqa: BLE001
                sub.closed = True
        self.subscribers.clear()
