"""Crash-safe reports (issue 17, item 7): ``attnkit report`` killed mid-run or mid-write leaves
a ``results.json`` that is valid JSON and not marked complete, and never leaves an older
complete report looking current.

The report runs in a subprocess with fake experiments: a module on ``PYTHONPATH`` defines them,
and the registry's ``MODULES`` is pointed at it before the CLI starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")

PLUGIN = textwrap.dedent('''
    import time
    from attnkit.experiment import Experiment, Result, stats

    def _decided(value):
        ci = stats.CI(value, value - 0.1, value + 0.1, 3)
        return [ci.decide("gain", threshold=0.0, direction=">")]

    def fast(ctx):
        return Result(metrics={"m": 1.0}, decisions=_decided(1.0))

    def big(ctx):
        # a large table makes each write of results.json take a while: room to kill mid-write
        rows = [{"i": i, "label": "row-%d" % i, "x": i * 0.5} for i in range(150_000)]
        return Result(metrics={"m": 2.0}, decisions=_decided(2.0), table=rows)

    def sleeper(ctx):
        time.sleep(120)
        return Result(metrics={"m": 3.0}, decisions=_decided(3.0))

    EXPERIMENTS = [Experiment("fast", "a fast claim", fast),
                   Experiment("big", "a claim with a big table", big),
                   Experiment("sleeper", "a claim that takes long", sleeper)]
''')

# With SLOW_FSYNC set, every fsync waits 0.3 s first: each atomic write then stays a while
# between "temporary file written" and "renamed into place", a window the test can kill in.
LAUNCH = ("import os, sys, time\n"
          "if os.environ.get('SLOW_FSYNC'):\n"
          "    _fsync = os.fsync\n"
          "    os.fsync = lambda fd: (time.sleep(0.3), _fsync(fd))[1]\n"
          "from attnkit.experiment import registry\n"
          "registry.MODULES[:] = ['attnkit_fake_crash_plugin']\n"
          "from attnkit import cli\n"
          "sys.exit(cli.main(sys.argv[1:]))\n")


def _start(tmp_path: Path, out: Path, *only: str, slow_fsync: bool = False) -> subprocess.Popen:
    (tmp_path / "attnkit_fake_crash_plugin.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(tmp_path)])}
    if slow_fsync:
        env["SLOW_FSYNC"] = "1"
    cmd = [sys.executable, "-c", LAUNCH, "report", "--quick", "--out", str(out), "--only", *only]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        if proc.poll() is not None:
            pytest.fail(f"report ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("timed out waiting for the report")


def _doc(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())  # must parse: never truncated


def _names(doc: dict) -> list[str]:
    return [e["name"] for e in doc["experiments"]]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_marks_the_report_interrupted(tmp_path, sig):
    out = tmp_path / "report"
    out.mkdir()
    # An older, complete report in the same folder must not survive the new run's start.
    (out / "results.json").write_text(json.dumps(
        {"env": {"started": "old"}, "quick": True, "status": "complete", "experiments": []}))
    (out / "index.html").write_text("<html>old complete report</html>")
    proc = _start(tmp_path, out, "fast", "sleeper")

    def fast_done() -> bool:
        try:
            return _names(_doc(out)) == ["fast"]
        except (OSError, ValueError):
            return False

    _wait_for(fast_done, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-2000:]
    doc = _doc(out)
    assert doc["status"] == "interrupted"
    assert doc["env"]["started"] != "old" and doc["env"]["torch"]
    assert _names(doc) == ["fast"] and doc["experiments"][0]["verdict"] == "held"
    page = (out / "index.html").read_text()
    assert 'data-status="interrupted"' in page
    assert "this report is incomplete" in page.lower() and "sleeper" in page
    assert not list(out.glob(".*.tmp*")), "temporary files left behind"


def test_kill_mid_write_leaves_valid_json_not_complete(tmp_path):
    out = tmp_path / "report"
    proc = _start(tmp_path, out, "fast", "big", "sleeper", slow_fsync=True)

    def writing_big() -> bool:  # a temporary file exists once "fast" is in: mid-write
        if not list(out.glob(".results.json.*")) and not list(out.glob(".index.html.*")):
            return False
        try:
            return "fast" in _names(_doc(out))
        except (OSError, ValueError):
            return False

    _wait_for(writing_big, proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=60)
    doc = _doc(out)
    assert doc["status"] == "running"  # never "complete"; the page says it is incomplete
    assert "fast" in _names(doc) and "sleeper" not in _names(doc)
    page = (out / "index.html").read_text()
    assert "incomplete" in page and 'data-status="running"' in page


def test_kill_before_the_first_experiment_ends_replaces_the_old_report(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    old = {"env": {"started": "old"}, "quick": True, "status": "complete",
           "experiments": [{"name": "sleeper", "verdict": "held"}]}
    (out / "results.json").write_text(json.dumps(old))
    proc = _start(tmp_path, out, "sleeper")
    _wait_for(lambda: _doc(out).get("status") == "running", proc)
    proc.kill()
    proc.communicate(timeout=60)
    doc = _doc(out)
    assert doc["status"] == "running" and doc["experiments"] == []
    assert 'data-status="running"' in (out / "index.html").read_text()
