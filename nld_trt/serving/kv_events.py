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
