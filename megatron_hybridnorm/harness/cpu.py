"""Make megatron-core's local (non-TE) modules run on a CPU-only torch.

megatron-core assumes CUDA in a handful of places: buffers allocated on
``torch.cuda.current_device()``, the CUDA RNG tracker, ``torch.cuda.current_stream()`` in DDP,
``torch.cuda.synchronize()``, ``device="cuda"`` literals in the optimizer, schedules and
buffers, ``tensor.type() == "torch.cuda.FloatTensor"`` checks in the optimizers, MoE split
sizes that become numpy arrays only when copied off a GPU, and the norm recompute's
``CheckpointWithoutOutput``, which takes FP8 as on whenever its ``fp8`` argument is not None
(False included) and then calls Transformer Engine. On a machine without a GPU,
``use_cpu()`` points each of these at the CPU (process-wide). It does nothing where CUDA is
available. ``hybridnorm-train`` and ``hybridnorm-check`` call it to run on a machine without a
GPU, and the tests' ranks do; it is not for large runs.
"""

from __future__ import annotations

import contextlib

import torch

_PATCHED = False


class _CpuStream:
    """Stands in for a CUDA stream: CPU work is already ordered. (A class, not a function:
    libraries annotate with ``torch.cuda.Stream | None``.)"""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return _CpuEvent()


class _CpuEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "rand", "randn",
    "randint", "zeros_like", "ones_like", "empty_like", "full_like",
)


def _on_cpu(factory):
    """Wrap a tensor factory so that ``device="cuda"`` (or a CUDA index) lands on the CPU."""

    def wrapped(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and (isinstance(device, int) or str(device).startswith("cuda")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    wrapped.__wrapped__ = factory
    return wrapped


def _type_as_if_cuda(original):
    """``tensor.type()`` names CPU tensors as CUDA ones (``torch.cuda.FloatTensor``): the
    optimizers and gradient clipping check those names. With an argument it converts, as usual."""

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    return type_


def _to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def use_cpu() -> bool:
    """Patch megatron-core's CUDA assumptions when there is no GPU. Returns True if patched."""
    global _PATCHED
    if torch.cuda.is_available():
        return False
    if _PATCHED:
        return True

    cpu_rng = torch.random
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.current_stream = lambda device=None: _CpuStream()
    torch.cuda.default_stream = lambda device=None: _CpuStream()
    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuEvent
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.get_rng_state = lambda device="cuda": cpu_rng.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": cpu_rng.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None

    from megatron.core.tensor_parallel import random as mrandom

    # The tracker keeps separate "CUDA" streams of randomness per model-parallel rank. On the
    # CPU they share torch's CPU generator: fork() saves and restores it around each use.
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        cpu_rng.get_rng_state()
    )
    mrandom._set_cuda_rng_state = lambda state, device=-1, graph_safe=False: cpu_rng.set_rng_state(
        state
    )

    def _add(self, name, seed):
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        orig = cpu_rng.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = cpu_rng.get_rng_state()
        cpu_rng.set_rng_state(orig)
        self.seeds_.add(seed)

    mrandom.CudaRNGStatesTracker.add = _add

    # megatron-core writes device="cuda" literally in its optimizer, schedules, buffers, ...
    for name in _FACTORIES:
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _type_as_if_cuda(torch.Tensor.type)
    # MoE token dispatch: split sizes become numpy arrays only when moved off a GPU, and
    # all_to_all_single does not take tensors.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    moe_utils.maybe_move_tensor_to_cpu = _to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = _to_cpu
    original_init = mrandom.CheckpointWithoutOutput.__init__

    def checkpoint_without_output_init(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = bool(fp8)  # megatron-core: `fp8 is not None`, so False meant FP8

    mrandom.CheckpointWithoutOutput.__init__ = checkpoint_without_output_init
    _PATCHED = True
    return True
