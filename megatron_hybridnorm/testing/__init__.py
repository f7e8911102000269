"""Support for running and testing megatron-core's local modules on CPU-only machines."""

from .cpu import use_cpu
from .distributed import Parallel, RankFailure, init_rank, run_distributed

__all__ = ["use_cpu", "run_distributed", "init_rank", "Parallel", "RankFailure"]
