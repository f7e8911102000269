"""Process group, parallel state and device: under torchrun or as one process."""

from __future__ import annotations

import os
import socket

import torch
from megatron_hybridnorm.harness.cpu import use_cpu


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(tp: int, pp: int, seed: int) -> torch.device:
    """Initialize torch.distributed (NCCL on GPUs, gloo on CPUs) and Megatron's parallel state."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed


    cuda = torch.cuda.is_available()
    if not cuda:
        use_cpu()
    if "RANK" not in os.environ:  # a plain `python -m ...`: be a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def teardown() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
