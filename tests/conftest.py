import os
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, the Triton kernels are tested under Triton's interpreter; it must be chosen
# before any kernel is defined. (The default "auto" dispatch still picks torch on the CPU.)
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


@pytest.fixture(scope="session")
def megatron_single_rank():
    """Megatron's parallel state for one rank (gloo on the CPU, NCCL on a GPU), in this process."""
    import torch

    from megatron_hybridnorm.testing import Parallel, init_rank

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        init_rank(0, 1, port, Parallel(), seed=1234)
    yield
