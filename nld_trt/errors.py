"""User-facing errors: each names what is wrong and how to fix it.

Every error a user can cause (a bad checkpoint, a bad request parameter) is an `NLDError`; the CLI prints
its message on one line and exits non-zero, and the server turns it into an error response.
"""

from __future__ import annotations

import sys


class NLDError(Exception):
    """Base class of the errors a user can cause and fix."""


class CheckpointError(NLDError):
    """The checkpoint directory is missing something, or holds something inconsistent."""


class GenerationError(NLDError, ValueError):
    """A generation request is invalid (bad parameter, prompt too long for the cache, ...)."""


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is the host or the GPU running out of memory (torch's OutOfMemoryError, checked only where
    torch is already imported: a process that never loaded it cannot have run out of GPU memory)."""
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ()))


def out_of_memory_error(e: BaseException, fix: str) -> NLDError:
    """The one-line error for running out of memory: the first line of what ran out (torch's says how much was
    asked of how much), then `fix`, what to ask for less of where the user meets it."""
    text = str(e).strip()
    return NLDError(f"out of memory ({text.splitlines()[0] if text else type(e).__name__}). {fix}")
