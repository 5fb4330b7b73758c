"""Decoding loops for `ar`, `dlm` and `linear_spec`, independent of the executor."""

from .driver import SEQUENCE_TYPES, Batcher, run
from .params import MODES, GenerationParams
from .sequence import Sequence, Stats

__all__ = ["MODES", "Batcher", "SEQUENCE_TYPES", "GenerationParams", "Sequence", "Stats", "run"]
