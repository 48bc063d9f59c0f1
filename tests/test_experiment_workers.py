"""Experiment worker pools end with the run that started them."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from attnkit.experiment.workers import process_pool, stop_pool


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def test_stop_pool_ends_running_jobs_at_once():
    pool = process_pool(1)
    pid = pool.submit(os.getpid).result()
    pool.submit(time.sleep, 60)
    t0 = time.perf_counter()
    stop_pool(pool)
    assert time.perf_counter() - t0 < 10 and not _alive(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_when_the_run_is_killed(tmp_path):
    """A run killed by SIGKILL (no cleanup at all) leaves no worker behind."""
    code = ("import os, time; from attnkit.experiment.workers import process_pool; "
            "p = process_pool(2); print(p.submit(os.getpid).result(), flush=True); "
            "p.submit(time.sleep, 120); p.submit(time.sleep, 120); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(proc.stdout.readline())
        assert _alive(worker)
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.time() + 20
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        proc.kill()


def test_process_pool_bad_input():
    with pytest.raises(ValueError, match="workers"):
        process_pool(0)
