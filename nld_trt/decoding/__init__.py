"""Decoding loops for `ar`, `dlm` and `linear_spec`, independent of the executor."""

from .driver import SEQUENCE_TYPES, run
from .params import MODES, GenerationParams
from .sequence import Sequence, Stats

__all__ = ["MODES", "SEQUENCE_TYPES", "GenerationParams", "Sequence", "Stats", "run"]
