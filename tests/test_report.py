"""``attnkit report``: every experiment runs, failures are recorded, HTML is escaped."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest

from attnkit import cli
from attnkit.experiment import Experiment, Option, Result
from attnkit.experiment import registry as experiments
from attnkit.experiment.report import collect_experiments, render_html, run_report, to_jsonable

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16  # bytes only; the report never decodes figures


def _passing(ctx):
    path = ctx.figure_path("fig.png")
    path.write_bytes(PNG)
    return Result(
        metrics={"err": np.float64(1e-12), "slope": 1.02},
        held=True,
        table=[{"L": 8, "seconds": 0.1}, {"L": 16, "seconds": 0.2}, {"case": "<a&b>", "ok": 1}],
        figures=[str(path)],
        params={"quick": ctx.quick},
        notes="notes with <b>markup</b> & ampersand",
    )


def _failing(ctx):
    raise ValueError("boom <img src=x onerror=alert(1)>")


def _needs_option(ctx):  # never called by the report
    raise AssertionError("a required option was missing: the report must skip this")


FAKE = {
    "pass": Experiment("pass", "Claim with <script>alert(1)</script>", _passing),
    "fail": Experiment("fail", "A claim that raises", _failing),
    "needs": Experiment("needs", "A claim on user data", _needs_option,
                        options=(Option("--fasta", required=True, help="FASTA file"),)),
}


def test_report_records_pass_fail_and_skip(tmp_path):
    entries = run_report(tmp_path, quick=True, experiments=FAKE)
    assert [e["name"] for e in entries] == ["pass", "fail", "needs"]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc) == {"env", "quick", "status", "experiments"}
    assert doc["quick"] is True and doc["status"] == "complete"
    files = doc["experiments"]
    assert files == entries
    ok, bad, skipped = files
    for e in files:
        assert {"name", "claim", "verdict", "metrics", "params", "figures", "seconds"} <= set(e)
    assert ok["verdict"] == "held" and ok["metrics"] == {"err": 1e-12, "slope": 1.02}
    assert ok["figures"] == ["pass/fig.png"]  # relative to the report directory
    assert (tmp_path / "pass" / "fig.png").is_file()
    assert ok["params"] == {"quick": True}
    assert bad["verdict"] == "not held" and "ValueError: boom" in bad["error"]
    assert "Traceback" in bad["error"]
    assert skipped["verdict"] == "not run" and skipped["skipped"] == "needs --fasta"

    page = (tmp_path / "index.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "boom &lt;img src=x" in page
    assert "&lt;b&gt;markup&lt;/b&gt; &amp; ampersand" in page
    assert "&lt;a&amp;b&gt;" in page
    assert '<img src="pass/fig.png"' in page
    assert "not run (needs --fasta)" in page
    assert "1 of 3 claims held" in page
    assert 'data-status="complete"' in page and "status-banner" not in page


def test_figures_outside_the_report_are_copied_in(tmp_path):
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(PNG)
    exp = Experiment("x", "c", lambda ctx: Result(metrics={}, held=False,
                                                 figures=[str(outside)]))
    out = tmp_path / "rep"
    (entry,) = run_report(out, experiments={"x": exp})
    assert entry["figures"] == ["x/elsewhere.png"]
    assert (out / "x" / "elsewhere.png").read_bytes() == PNG


def test_only_selects_and_rejects_unknown(tmp_path):
    entries = run_report(tmp_path, experiments=FAKE, only=["pass"])
    assert [e["name"] for e in entries] == ["pass"]
    with pytest.raises(ValueError, match="unknown experiment"):
        run_report(tmp_path, experiments=FAKE, only=["nope"])


def test_cli_report_exit_codes(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(experiments, "registry", lambda: dict(FAKE))
    assert cli.main(["report", "--quick", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "1 of 3 claims held, 1 raised, 1 not run" in captured.err
    assert "fail raised: ValueError: boom" in captured.err
    assert captured.out.strip().endswith("index.html")
    assert cli.main(["report", "--strict", "--out", str(tmp_path)]) == 1
    assert cli.main(["report", "--only", "nope", "--out", str(tmp_path)]) == 2


def test_a_module_that_fails_to_import_does_not_hide_the_others(monkeypatch, tmp_path):
    (tmp_path / "attnkit_fake_broken.py").write_text("raise RuntimeError('broken on import')\n")
    (tmp_path / "attnkit_fake_good.py").write_text(textwrap.dedent("""
        from attnkit.results import Experiment, Result
        EXPERIMENT = Experiment("good", "c", lambda ctx: Result(metrics={"m": 1}, held=True))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(experiments, "MODULES", ["attnkit_fake_broken", "attnkit_fake_good"])
    try:
        found, broken = collect_experiments()
        assert list(found) == ["good"]
        assert [m for m, _ in broken] == ["attnkit_fake_broken"]
        assert "broken on import" in broken[0][1]
        entries = run_report(tmp_path / "rep")
        assert [(e["name"], e["verdict"]) for e in entries] == [
            ("attnkit_fake_broken", "not held"), ("good", "held")]
    finally:
        for mod in ("attnkit_fake_broken", "attnkit_fake_good"):
            sys.modules.pop(mod, None)


def test_to_jsonable_and_html_of_nan():
    import torch

    assert to_jsonable({"a": np.float32(1.5), "b": torch.tensor([1, 2]), "c": float("inf"),
                        "d": (np.int8(3),)}) == {"a": 1.5, "b": [1, 2], "c": None, "d": [3]}
    page = render_html([{"name": "n", "claim": "c", "verdict": "held",
                         "metrics": {"m": None}, "seconds": 1.0}])
    assert "\u2014" in page  # null metrics shown as a dash, not "None"


ENV_KEYS = {"attnkit", "git_commit", "git_dirty", "torch", "python", "platform", "cpu",
            "cpu_count", "threads", "kernels", "started"}


def test_results_json_carries_provenance(tmp_path):
    import torch

    import attnkit
    from attnkit.experiment.report import load_results

    run_report(tmp_path, experiments={"pass": FAKE["pass"]})
    doc = load_results(tmp_path)
    env = doc["env"]
    assert ENV_KEYS <= set(env)
    assert env["attnkit"] == attnkit.__version__ and env["torch"] == torch.__version__
    assert env["threads"] == torch.get_num_threads() and env["cpu"]
    assert set(env["kernels"]) == {"band", "decode", "short", "gemv", "step"}
    for state in env["kernels"].values():
        assert isinstance(state["available"], bool)
        assert state["reason"] is None if state["available"] else isinstance(state["reason"], str)
    # this test runs from a git checkout: the commit is a 40-digit hash
    commit = env["git_commit"]
    assert commit is None or (len(commit) == 40 and isinstance(env["git_dirty"], bool))
    page = (tmp_path / "index.html").read_text()
    assert env["torch"] in page and "compiled kernels" in page
    (tmp_path / "old.json").write_text("[]")
    with pytest.raises(ValueError, match="not an attnkit results.json"):
        load_results(tmp_path / "old.json")


def test_git_state_outside_a_checkout(tmp_path):
    from attnkit.experiment.provenance import git_state

    assert git_state(tmp_path) == (None, None)
