"""Worker processes for experiments that run independent jobs beside their main work.

Workers are started with the ``spawn`` method (no inherited torch thread pools or locks) and die
with the process that started them: on Linux each asks the kernel for a signal when its parent
ends (``PR_SET_PDEATHSIG``), so a run killed by a signal (``kill``, a job scheduler's timeout)
leaves no worker training on; :func:`stop_pool` ends a pool at once when a run is interrupted
(an exception, Ctrl-C) instead of waiting for the jobs in flight.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

__all__ = ["process_pool", "stop_pool"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Worker initializer: SIGKILL this worker when its parent process ends."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        except (OSError, AttributeError):
            pass  # no prctl: the pool's own shutdown is the only guard
    if os.getppid() != parent:  # the parent ended before the request took effect
        os._exit(1)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes that end with this process (see the module)."""
    import multiprocessing as mp

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                               initializer=_die_with_parent, initargs=(os.getpid(),))


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """End ``pool`` now: cancel the jobs not started and terminate the workers running one
    (an interrupted run does not wait minutes for work nobody will read)."""
    # the workers are private to the executor (and shutdown forgets them): terminating them
    # is what shutdown cannot do
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=5)
