"""Executors run one NLD forward pass over a batch of chunks; the decoding loops use nothing else."""

from .base import Chunk, Executor
from .torch_executor import TorchExecutor

__all__ = ["Chunk", "Executor", "TorchExecutor"]
