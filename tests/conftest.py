import os
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, the Triton kernels are tested under Triton's interpreter; it must be chosen
# before any kernel is defined. (The default dispatch still picks torch.)
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


if os.environ.get("TRITON_INTERPRET") == "1":
    from triton_interpreter import fix_old_triton_interpreter_index

    fix_old_triton_interpreter_index()


@pytest.fixture(scope="session")
def megatron_single_rank():
    """Megatron's parallel state for one rank (gloo on the CPU, NCCL on a GPU), in this process."""
    import torch

    from launcher import Parallel, init_rank

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        init_rank(0, 1, port, Parallel(), seed=1234)
    yield


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Where a test of the Triton kernels runs: "cpu" under Triton's interpreter, "cuda" natively
    (a GPU test: selected by ``-m gpu``, skipped without a CUDA device).

    The cpu variant makes "meta" torch's default device while the test runs: a tensor that the
    test (or the code it calls) creates without naming a device lands on meta and fails, so the
    cuda variant, which runs the same code, puts everything on the device it is given."""
    import torch

    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        yield torch.device("cuda")
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a CUDA device is present): the cuda variant "
                    "of this test runs instead")
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield torch.device("cpu")
    finally:
        torch.set_default_device(previous)
