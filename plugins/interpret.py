"""Run this package's Triton kernels in Triton's CPU interpreter: how tests run them without a GPU.

`@triton.jit` picks interpreted or compiled when a function is decorated, so the kernel modules are
imported (by plugins.runtime.kernel) with Triton's interpreter knob forced to this package's mode and
restored afterwards: the mode applies to nld_trt.plugins kernels only, whatever else in the process uses
Triton, and no environment variable is changed. The kernels call only Triton builtins and tl.reduce with
the standard combine functions (not tl.max / tl.sum / tl.zeros, which are themselves @jit functions
decorated in whatever mode triton was imported), so they interpret correctly either way.
"""

from __future__ import annotations

import os

_state = {"interpret": os.environ.get("TRITON_INTERPRET", "0") == "1", "loaded": None}


def use_interpreter() -> None:
    """Interpret this package's kernels from now on (call before the first kernel launch)."""
    if _state["loaded"] is False:
        raise RuntimeError("nld_trt.plugins kernels were already loaded compiled in this process")
    _state["interpret"] = True


def interpreting() -> bool:
    """Whether this package's kernels run (or will run) in the interpreter."""
    return _state["interpret"]


def mark_loaded(interpret: bool) -> None:
    _state["loaded"] = interpret
