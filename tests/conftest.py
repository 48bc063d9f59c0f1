"""Shared fixtures. Real data lives in ../shared/data beside the project root; tests that need
it skip cleanly when it is absent.

``ATTNKIT_TEST_DEVICE=cuda`` runs the engine tests (those taking the ``device`` fixture or
using ``TEST_DEVICE``) on the GPU; without a CUDA device they skip, saying why. The default is
the CPU."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: The device the engine tests run on: ``ATTNKIT_TEST_DEVICE`` (``cpu`` or ``cuda``).
TEST_DEVICE = os.environ.get("ATTNKIT_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if TEST_DEVICE not in ("cpu", "cuda"):
    raise pytest.UsageError(f"ATTNKIT_TEST_DEVICE must be cpu or cuda, got {TEST_DEVICE!r}")


def skip_unless_device_available() -> None:
    """Skip the calling test when ``ATTNKIT_TEST_DEVICE=cuda`` but there is no CUDA device."""
    if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("ATTNKIT_TEST_DEVICE=cuda, but no CUDA device is available")


@pytest.fixture
def device() -> torch.device:
    """The engine tests' device (``ATTNKIT_TEST_DEVICE``), or skip when it is not there."""
    skip_unless_device_available()
    return torch.device(TEST_DEVICE)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``, or skip the test when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@contextlib.contextmanager
def thread_team(n: int, limit: int):
    """``torch.set_num_threads(n)`` and the compiled kernels' team limit
    (:func:`attnkit.kernels.native.set_team_limit`: the work is cut for ``n`` threads, at most
    ``limit`` start; 0: no limit) for the duration."""
    from attnkit.kernels import native

    old_n = torch.get_num_threads()
    torch.set_num_threads(n)
    old_limit = native.set_team_limit(limit)
    try:
        yield
    finally:
        native.set_team_limit(old_limit)
        torch.set_num_threads(old_n)


def passed_with_isa_flags(flags: list[str], file: str, tests: list[str]) -> int:
    """Run ``tests`` of ``file`` in a child process whose native kernels are built with the
    extra compiler ``flags`` (e.g. ``-mno-avx512f``: the code paths of a machine without
    AVX-512); assert that all passed and return how many ran."""
    code = (f"import sys, pytest, attnkit.kernels.native as n; n._FLAGS = n._FLAGS + {flags!r}; "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider'] + "
            f"[{file!r} + '::' + t for t in {tests!r}]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    marks = res.stdout.strip().splitlines()[0].split()[0]  # one "." per passed test
    assert set(marks) == {"."}, res.stdout[-3000:]
    return len(marks)
