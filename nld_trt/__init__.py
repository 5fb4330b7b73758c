"""nld-trt: Nemotron-Labs-Diffusion checkpoints to quantized TensorRT engines served by Triton.

The data path: checkpoint (`checkpoint`, `config`, `tokenizer`) -> one model definition (`model`) ->
executors (`executors`) -> decoding loops that know nothing of the executor (`decoding`) -> serving.

The names below are imported when first used, so that a process that needs only a light part (the Triton
tokenizer model, `nld-trt --help`) does not import PyTorch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "NLD": ".runtime", "GenerationResult": ".runtime", "load": ".runtime", "NLDConfig": ".config",
    "GenerationParams": ".decoding", "CheckpointError": ".errors", "GenerationError": ".errors",
    "NLDError": ".errors",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from .config import NLDConfig
    from .decoding import GenerationParams
    from .errors import CheckpointError, GenerationError, NLDError
    from .runtime import NLD, GenerationResult, load


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
