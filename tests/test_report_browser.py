"""The report page in a real browser (issue 18, item 6): headless Chromium renders the
``index.html`` of a small report; every image loads, no console message (error or otherwise)
is logged, and every experiment has its section and decision table.

The page records images that failed to load into ``<body data-broken-images>`` on its load
event, which ``--dump-dom`` shows; console messages reach Chromium's stderr log as ``CONSOLE``
lines. ``.ci/run`` installs the Debian package ``chromium`` when missing; without it this test
skips.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from attnkit.experiment import Experiment, Result, stats
from attnkit.experiment.report import render_html, run_report

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="headless Chromium not installed (Debian: apt-get install chromium; "
    ".ci/run installs it when apt is available)")

# A valid 1x1 PNG, for when matplotlib is not installed.
TINY_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
                            "DwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def _experiment(name: str, value: float) -> Experiment:
    def run(ctx):
        plt = ctx.pyplot()
        if plt is None:
            path = ctx.figure_path(f"{name}.png")
            path.write_bytes(TINY_PNG)
            fig = str(path)
        else:
            f, ax = plt.subplots(figsize=(3, 2))
            ax.plot([1, 2, 3], [1, 4, 9])
            ax.set(xlabel="size", ylabel="cost")
            fig = ctx.save_figure(f, f"{name}.png", dpi=50)
        gain = stats.mean_ci([value - 0.1, value, value + 0.1])
        return Result(metrics={"a_metric_with_a_rather_long_name_that_must_wrap": 1.0},
                      decisions=[gain.decide("gain_with_a_long_deciding_quantity_name", 0.0)],
                      seeds=3, figures=[fig], table=[{"L": 8, "seconds": 0.1}],
                      notes="fake experiment for the browser check")
    return Experiment(name, f"{name} claim: a gain above zero", run)


def _render(page: Path, tmp_path: Path) -> tuple[str, str]:
    """``(dom, stderr)`` of ``page`` rendered by headless Chromium."""
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr",
           "--v=0", "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def _body_attr(dom: str, attr: str) -> str | None:
    m = re.search(r"<body[^>]*\s" + attr + r'="([^"]*)"', dom)
    return None if m is None else m.group(1)


def test_report_renders_in_chromium(tmp_path):
    out = tmp_path / "report"
    exps = {n: _experiment(n, v) for n, v in (("alpha", 1.0), ("beta_inconclusive", 0.05))}
    entries = run_report(out, quick=True, experiments=exps)
    assert [e["verdict"] for e in entries] == ["held", "inconclusive"]

    dom, log = _render(out / "index.html", tmp_path)
    assert _body_attr(dom, "data-images") == "2", "the page's image check did not run"
    assert _body_attr(dom, "data-broken-images") == "", "images failed to load"
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert not console, console
    assert _body_attr(dom, "data-status") == "complete" and "status-banner" not in dom
    for name in exps:
        section = re.search(r'<section class="experiment" id="exp-' + name + r'">(.*?)</section>',
                            dom, re.S)
        assert section, f"no section for {name}"
        body = section.group(1)
        assert 'class="full decisions"' in body and "gain_with_a_long" in body
        # the decision table comes before the figures, the metrics after them
        assert body.index("decisions") < body.index("<img") < body.index("Metrics")
        assert 'href="#top"' in body
    assert 'class="full summary"' in dom
    assert "torch" in dom and "compiled kernels" in dom  # the provenance header


def test_the_browser_check_sees_a_broken_image(tmp_path):
    """The check can fail: a figure that does not exist is reported as broken."""
    entry = {"name": "x", "claim": "c", "verdict": "held", "decisions": [], "metrics": {},
             "figures": ["x/missing.png"], "seconds": 0.1}
    page = tmp_path / "index.html"
    page.write_text(render_html([entry], status="running"))
    dom, _ = _render(page, tmp_path)
    assert _body_attr(dom, "data-broken-images") == "x/missing.png"
    assert "this report is incomplete" in dom.lower()
