"""nld-trt: Nemotron-Labs-Diffusion checkpoints to quantized TensorRT engines served by Triton.

The data path: checkpoint (`checkpoint`, `config`, `tokenizer`) -> one model definition (`model`) ->
executors (`executors`) -> decoding loops that know nothing of the executor (`decoding`) -> serving.
"""

from .config import NLDConfig
from .decoding import GenerationParams
from .errors import CheckpointError, GenerationError, NLDError
from .runtime import NLD, GenerationResult, load

__version__ = "0.1.0"

__all__ = [
    "NLD",
    "CheckpointError",
    "GenerationError",
    "GenerationParams",
    "GenerationResult",
    "NLDConfig",
    "NLDError",
    "load",
]
