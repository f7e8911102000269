"""The tests' (and the benchmarks') multi-process launcher: run a function on N gloo processes
with Megatron's parallel state set up, and report each rank's failure clearly. Hangs end at a
timeout that names the ranks that did not finish. It lives beside the tests, not in the wheel."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from dataclasses import dataclass


@dataclass(frozen=True)
class Parallel:
    """A parallel layout for ``initialize_model_parallel``."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    ep: int = 1


class RankFailure(RuntimeError):
    """One or more ranks raised, or did not finish in time."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank: int, world_size: int, port: int, layout: Parallel, seed: int) -> None:
    """Set up one rank: CPU patches, the gloo group and Megatron's parallel state."""
    import torch

    from megatron_hybridnorm.harness.cpu import use_cpu

    use_cpu()
    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton_interpreter import fix_old_triton_interpreter_index

        fix_old_triton_interpreter_index()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    # an explicit address, not environment variables that child processes would inherit
    torch.distributed.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    from megatron_hybridnorm.harness.dist_ckpt import use_in_process_write_queue

    use_in_process_write_queue()  # no Manager process (seconds to start) for checkpoint saves


def _worker(rank, world_size, port, layout, seed, fn, args, kwargs, results):
    try:
        init_rank(rank, world_size, port, layout, seed)
        # plain pickle: a queue would share tensors through memory that dies with this process
        out = pickle.dumps(fn(*args, **kwargs))
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - every failure is reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch

            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


@contextlib.contextmanager
def _cpu_ranks():
    """Spawned processes inherit the environment at start: hide CUDA from them, and give them
    Triton's interpreter (for tests that force the kernels on the CPU)."""
    saved = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")}
    os.environ.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_distributed(
    fn,
    world_size: int,
    layout: Parallel = Parallel(),
    *,
    args: tuple = (),
    kwargs: dict | None = None,
    seed: int = 1234,
    timeout: float = 300.0,
) -> list:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return the results by rank.

    ``fn`` must be importable (a module-level function). Raises ``RankFailure`` with every
    failing rank's traceback, or with the ranks still running at the timeout (then killed).
    The ranks run on the CPU with gloo, CUDA hidden from them, also on a GPU machine: a
    one-rank run and its multi-rank twin then compute on the same device, and NCCL (which
    refuses two ranks on one GPU) is not needed.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, layout, seed, fn, args, kwargs or {}, results),
            # not daemonic: megatron-core 0.16's dist-checkpoint writer starts a process per
            # bucket, which daemonic processes may not; the ranks are killed below in any case
            daemon=False,
        )
        for r in range(world_size)
    ]
    with _cpu_ranks():
        for p in procs:
            p.start()
    outcome: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
                outcome[rank] = (status, value)
                if status == "error":
                    # The others are probably blocked in a collective with this rank.
                    deadline = min(deadline, time.monotonic() + 10.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outcome]
                if dead and results.empty():
                    time.sleep(0.5)
                    if results.empty():
                        for r in dead:
                            outcome[r] = ("error", f"process exited with code {procs[r].exitcode}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)

    errors = [f"rank {r}:\n{v}" for r, (s, v) in sorted(outcome.items()) if s == "error"]
    missing = [r for r in range(world_size) if r not in outcome]
    if errors or missing:
        msg = []
        if errors:
            msg.append("\n".join(errors))
        if missing:
            msg.append(
                f"ranks {missing} did not finish within {timeout:.0f} s "
                "(a hang, or blocked on a failed rank); they were killed"
            )
        raise RankFailure(f"{fn.__module__}.{fn.__qualname__} on {world_size} ranks, "
                          f"{layout}:\n" + "\n".join(msg))
    return [pickle.loads(outcome[r][1]) for r in range(world_size)]
