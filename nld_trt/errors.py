"""User-facing errors: each names what is wrong and how to fix it.

Every error a user can cause (a bad checkpoint, a bad request parameter) is an `NLDError`; the CLI prints
its message on one line and exits non-zero, and the server turns it into an error response.
"""

from __future__ import annotations


class NLDError(Exception):
    """Base class of the errors a user can cause and fix."""


class CheckpointError(NLDError):
    """The checkpoint directory is missing something, or holds something inconsistent."""


class GenerationError(NLDError, ValueError):
    """A generation request is invalid (bad parameter, prompt too long for the cache, ...)."""
