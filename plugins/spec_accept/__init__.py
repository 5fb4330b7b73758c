"""Selection on the GPU: greedy speculative acceptance and the dlm fill rule, from logits to decisions."""

from .launch import SelectConfig
from .ops import dlm_select, spec_accept

__all__ = ["SelectConfig", "dlm_select", "spec_accept"]
