"""A workaround for megatron-core's dist-checkpoint writer, shared by the trainer and the tests."""

from __future__ import annotations

import queue


def use_in_process_write_queue() -> None:
    """Let synchronous saves collect the writer's results in an in-process queue.

    megatron-core creates a ``multiprocessing.Manager`` queue for them at the first save: its
    spawned server process costs seconds, and daemonic processes (test ranks) may not start it.
    Synchronous saves write in this process, so a plain queue serves.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", 0) is None:
        filesystem_async._results_queue = queue.Queue()
