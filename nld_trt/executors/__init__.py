"""Executors run one NLD forward pass over a batch of chunks and page tables; the decoding loops use nothing else."""

from .base import Chunk, Executor, PassBatch, PassRow
from .torch_executor import TorchExecutor

__all__ = ["Chunk", "Executor", "PassBatch", "PassRow", "TorchExecutor"]
