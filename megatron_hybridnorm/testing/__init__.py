"""What the tests use: the multi-process launcher on gloo (the CPU patches it applies are
``megatron_hybridnorm.harness.cpu``, a product feature) and a fix for old Triton interpreters."""

from megatron_hybridnorm.testing.distributed import Parallel, RankFailure, init_rank, run_distributed

__all__ = ["run_distributed", "init_rank", "Parallel", "RankFailure"]
