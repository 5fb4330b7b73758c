"""The text of one sequence's output: stop strings, what streaming may send, the final text.

A stop string ends generation at its first occurrence in the decoded output text (OpenAI's behaviour): the
returned text ends just before it. dlm and linear_spec commit many tokens per step, so an occurrence can
span steps and blocks; each step searches the text from just before what the previous step had seen. The
token ids kept are those up to the one that completed the stop string.

Streaming must never send text it might have to take back: `releasable` gives the longest output prefix
whose text ends on a complete character and has no tail that could still grow into a stop string, so the
concatenation of what was streamed always equals the final text.
"""

from __future__ import annotations

from collections.abc import Callable

Decode = Callable[[list[int]], str]
REPLACEMENT = "\ufffd"  # an incomplete UTF-8 character of byte-level tokens, so far


class OutputText:
    def __init__(self, decode: Decode | None, stops: tuple[str, ...] = ()) -> None:
        self.decode = decode
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self._seen = 0  # text length the last search covered
        self.cut: str | None = None  # the text before the stop string that ended generation

    def find_stop(self, out: list[int], first_new: int) -> tuple[int, str] | None:
        """After out[first_new:] were appended: (k, stop) if a stop string now occurs, k being the fewest
        tokens whose text contains it; sets `cut`."""
        if not self.stops:
            return None
        text = self.decode(out)
        start = max(0, self._seen - self.longest - 3)  # 3: a trailing incomplete character may change
        self._seen = len(text)
        if _earliest(text, self.stops, start) is None:
            return None
        for k in range(first_new + 1, len(out) + 1):
            prefix = self.decode(out[:k]) if k < len(out) else text
            hit = _earliest(prefix, self.stops, start)
            if hit is not None:
                self.cut = prefix[: hit[0]]
                return k, hit[1]
        raise AssertionError("unreachable: the full text contains a stop string")

    def final(self, out: list[int], drop_last: bool = False) -> str:
        """The returned text: before the stop string, or of every token (but a final stop token)."""
        if self.cut is not None:
            return self.cut
        return self.decode(out[:-1] if drop_last else out)

    def releasable(self, out: list[int]) -> tuple[int, str]:
        """(k, text of out[:k]) for the largest k whose text streaming may send now."""
        for k in range(len(out), 0, -1):
            text = self.decode(out[:k])
            if not text.endswith(REPLACEMENT) and not self._may_grow_into_stop(text):
                return k, text
        return 0, ""

    def _may_grow_into_stop(self, text: str) -> bool:
        return any(text.endswith(s[:i]) for s in self.stops for i in range(1, len(s)))


def _earliest(text: str, stops: tuple[str, ...], start: int) -> tuple[int, str] | None:
    """(position, stop) of the stop string occurring first in text[start:]."""
    best = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best
