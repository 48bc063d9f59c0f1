"""Small, reusable timing and peak-memory helpers for experiments and benchmarks.

``measure(fn, *args)`` gives the median wall time of a call. ``peak_rss_subprocess(fn, *args)``
gives the peak resident memory a call adds, measured in a fresh Python process: ``tracemalloc``
cannot see torch's C++ allocations, and the high-water mark of a long-lived process only ever
grows, so the only trustworthy peak is one taken in a clean process around exactly one call.
``peak_rss_sweep`` measures many calls in one child (paying the ~2-3 s torch import once); on
Linux it resets the high-water mark between calls (``/proc/self/clear_refs``), elsewhere it falls
back to one child per call.

Functions passed to the subprocess helpers must be picklable, i.e. defined at module level in an
importable module (not lambdas or closures).
"""

from __future__ import annotations

import gc
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["measure", "peak_rss_subprocess", "peak_rss_sweep", "rss_reset_supported"]

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def sync_device() -> None:
    """Wait for queued GPU work so wall time covers it (no-op on CPU)."""
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(
    fn: Callable[..., Any],
    *args: Any,
    repeat: int = 5,
    warmup: int = 1,
    min_seconds: float = 0.0,
    **kwargs: Any,
) -> float:
    """Median wall-clock seconds of ``fn(*args, **kwargs)``.

    Runs ``warmup`` untimed calls, then at least ``repeat`` timed calls, continuing until
    ``min_seconds`` of timed calls have accumulated (helps very short calls on a noisy machine).
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        fn(*args, **kwargs)
    sync_device()
    times: list[float] = []
    total = 0.0
    while len(times) < repeat or total < min_seconds:
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        sync_device()
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
        if len(times) >= 1000:
            break
    return statistics.median(times)


# ----------------------------------------------------------------------- resident memory


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), e.g. ``VmRSS`` or ``VmHWM``."""
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_reset_supported() -> bool:
    """True when this process can reset its peak-RSS mark (Linux ``clear_refs``)."""
    return _status_kib("VmHWM") is not None and os.access(_CLEAR_REFS, os.W_OK)


def _maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _measure_call(fn, args, kwargs, setup, reset: bool) -> int:
    """Bytes the peak RSS rises during ``fn(*setup(*args))`` above the RSS just before it."""
    call_args = setup(*args, **kwargs) if setup is not None else args
    call_kwargs = {} if setup is not None else kwargs
    if not isinstance(call_args, tuple):
        call_args = (call_args,)
    gc.collect()
    if reset:
        _CLEAR_REFS.write_text("5")  # VmHWM := current RSS
        base = (_status_kib("VmRSS") or 0) * 1024
        fn(*call_args, **call_kwargs)
        peak = (_status_kib("VmHWM") or 0) * 1024
    else:
        # ru_maxrss cannot be reset: only growth above the process's earlier peak is visible.
        base = _maxrss_bytes()
        fn(*call_args, **call_kwargs)
        peak = _maxrss_bytes()
    del call_args
    return max(0, peak - base)


def _child_main(payload_path: str, result_path: str) -> None:
    """Entry point of the measuring child (run via ``python -c``)."""
    with open(payload_path, "rb") as f:
        parent_path, main_path, blob = pickle.load(f)
    for p in reversed(parent_path):  # the parent's sys.path, so its functions unpickle here
        if p not in sys.path:
            sys.path.insert(0, p)
    if main_path:  # functions from the parent's script: load it as multiprocessing's spawn does
        import runpy
        import types

        main = types.ModuleType("__mp_main__")
        main.__dict__.update(runpy.run_path(main_path, run_name="__mp_main__"))
        sys.modules["__main__"] = sys.modules["__mp_main__"] = main
    fn, setup, calls, reset = pickle.loads(blob)
    if reset:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            reset = False
    peaks = [_measure_call(fn, args, kwargs, setup, reset) for args, kwargs in calls]
    with open(result_path, "wb") as f:
        pickle.dump(peaks, f)


# Large frees go straight back to the OS, so a call's peak is not hidden by memory that glibc
# keeps from an earlier call (only matters when several calls share one child).
_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _run_child(fn, setup, calls, reset: bool, timeout: float | None) -> list[int]:
    with tempfile.TemporaryDirectory(prefix="attnkit-rss-") as tmp:
        payload, result = Path(tmp) / "payload.pkl", Path(tmp) / "result.pkl"
        blob = pickle.dumps((fn, setup, calls, reset))
        main_path = None
        if any(getattr(f, "__module__", None) == "__main__" for f in (fn, setup)):
            main_path = getattr(sys.modules["__main__"], "__file__", None)
            if main_path is None:
                raise ValueError("fn/setup defined interactively cannot run in a subprocess")
        with open(payload, "wb") as f:
            pickle.dump((list(sys.path), main_path, blob), f)
        code = (
            "import sys; from attnkit.experiment.profiling import _child_main; "
            "_child_main(sys.argv[1], sys.argv[2])"
        )
        env = {**os.environ, **_CHILD_ENV}
        proc = subprocess.run(
            [sys.executable, "-c", code, str(payload), str(result)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # the parent's stdout may carry JSON: keep it clean
            stderr=subprocess.PIPE,
            env=env,
            timeout=timeout,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"memory-measuring subprocess failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-4000:]}"
            )
        with open(result, "rb") as f:
            return pickle.load(f)


def peak_rss_subprocess(
    fn: Callable[..., Any],
    *args: Any,
    setup: Callable[..., Any] | None = None,
    timeout: float | None = 600.0,
    **kwargs: Any,
) -> int:
    """Peak resident memory (bytes) that one call adds, measured in a fresh Python process.

    Without ``setup`` the child runs ``fn(*args, **kwargs)``. With ``setup`` it runs
    ``inputs = setup(*args, **kwargs)`` first (not counted; e.g. allocate the tensors in the
    child instead of pickling them), then measures ``fn(*inputs)`` (a non-tuple result is passed
    as the single argument). The result is the peak RSS during the call minus the RSS just
    before it (Linux), or the rise of ``ru_maxrss`` over its value after imports and setup
    (elsewhere; this under-reports calls smaller than the import-time peak).

    ``fn`` and ``setup`` must be picklable: module-level functions of an importable module or of
    the running script (guard its top level with ``if __name__ == "__main__":``).
    """
    return _run_child(fn, setup, [(args, kwargs)], True, timeout)[0]


def peak_rss_sweep(
    fn: Callable[..., Any],
    arg_list: Sequence[tuple],
    *,
    setup: Callable[..., Any] | None = None,
    timeout: float | None = 600.0,
    fresh_process: bool = False,
) -> list[int]:
    """:func:`peak_rss_subprocess` for each argument tuple in ``arg_list``.

    When the peak can be reset between calls (Linux) and ``fresh_process`` is false, all calls
    run in one child, in order (run small sizes first); otherwise each call gets its own child.
    Returns one byte count per argument tuple.
    """
    calls = [(tuple(a), {}) for a in arg_list]
    if not calls:
        return []
    if not fresh_process and rss_reset_supported():
        return _run_child(fn, setup, calls, True, timeout)
    return [_run_child(fn, setup, [c], True, timeout)[0] for c in calls]
