"""Provenance of a run: what produced these numbers (the ``"env"`` object of ``results.json``
and of each ``attnkit run NAME --json`` object)::

    {"attnkit": "0.1.0", "git_commit": "5ac296c..." | null, "git_dirty": bool | null,
     "torch": "2.13.0", "python": "3.12.3", "platform": "Linux-...", "cpu": "AMD EPYC ...",
     "cpu_count": 2, "threads": 2, "kernels": {"band": {"available": true, "reason": null}, ...},
     "started": "2025-01-01T12:00:00+00:00"}

``git_commit`` / ``git_dirty`` are null when attnkit is not run from a git checkout (an
installed wheel) or git is missing. ``kernels`` is
:func:`attnkit.kernels.native.kernel_status` (whether each compiled kernel is in use, and why
not); ``threads`` is torch's intra-op thread count at the start.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["environment", "cpu_model", "git_state"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS), else
    :func:`platform.processor`, else ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or "unknown"


def git_state(path: str | os.PathLike[str] | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout holding ``path`` (default: this package's
    source), or ``(None, None)`` when it is not in a checkout or git is unavailable. ``dirty``
    is True when tracked files differ from the commit."""
    here = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(here), *args], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    # Only a checkout that tracks this directory counts (not a site-packages that happens to
    # lie inside some other repository).
    if not git("ls-files", "."):
        return None, None
    commit = git("rev-parse", "HEAD")
    if not commit:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None else bool(status))


def environment() -> dict[str, Any]:
    """The provenance object of a run (see the module docstring)."""
    import torch

    from .. import __version__

    try:
        from ..kernels.native import kernel_status

        kernels: dict[str, Any] = kernel_status()
    except Exception as e:  # provenance must never stop a run; say what went wrong instead
        kernels = {"error": f"{type(e).__name__}: {e}"}
    commit, dirty = git_state()
    return {
        "attnkit": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "kernels": kernels,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
