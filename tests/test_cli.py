"""The ``attnkit`` command: list, run (JSON contract, options, errors) and ``python -m``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attnkit import cli
from attnkit.results import Experiment, Option, Result

JSON_KEYS = {"name", "claim", "verdict", "metrics", "params", "figures", "seconds"}


def _fake(run, options=(), name="fake") -> dict[str, Experiment]:
    return {name: Experiment(name=name, claim=f"{name} claim", run=run, options=options)}


def _use(monkeypatch, experiments: dict[str, Experiment]) -> None:
    monkeypatch.setattr(cli, "collect_experiments", lambda: (experiments, []))


def test_list_names_every_registered_experiment(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "engine" in out
    assert "dense masked softmax attention" in out


def test_run_engine_quick_json_subprocess(tmp_path):
    """The issue's contract: ``attnkit run engine --quick --json`` parses, last line on stdout.

    ``--max-len 1024 --no-memory`` keeps the scaling sweep tiny so the test stays fast.
    """
    cmd = [sys.executable, "-m", "attnkit", "run", "engine", "--quick", "--json",
           "--max-len", "1024", "--no-memory", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "stdout must carry only the JSON object (logs go to stderr)"
    obj = json.loads(lines[-1])
    assert JSON_KEYS <= set(obj)
    assert obj["name"] == "engine"
    assert obj["verdict"] in ("held", "not held")
    assert isinstance(obj["seconds"], (int, float)) and obj["seconds"] > 0
    for name, value in obj["metrics"].items():
        assert value is None or isinstance(value, (int, float)), name
    # Exactness is measured fully even in the tiny sweep.
    assert obj["metrics"]["max_err_fwd"] < 1e-10
    assert obj["metrics"]["max_err_grad"] < 1e-10
    assert obj["metrics"]["slope_dense"] is not None  # two dense sizes (512, 1024)
    assert obj["params"]["max_len"] == 1024
    for fig in obj["figures"]:
        assert Path(fig).is_file()


def test_unknown_experiment_lists_names_and_exits_2(capsys):
    assert cli.main(["run", "no-such-experiment"]) == 2
    err = capsys.readouterr().err
    assert "no-such-experiment" in err and "engine" in err


def test_run_help_lists_experiment_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "engine", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--quick", "--json", "--out", "--max-len", "--no-memory"):
        assert flag in out


def test_run_without_name_is_a_usage_error(capsys):
    assert cli.main(["run", "--quick"]) == 2
    assert "NAME" in capsys.readouterr().err


def test_json_converts_numpy_torch_and_nan_and_keeps_stdout_clean(monkeypatch, capsys, tmp_path):
    def run(ctx):
        print("chatter from the experiment")  # must not reach stdout
        assert ctx.options == {"size": 7, "label": "x"}
        assert ctx.quick
        return Result(
            metrics={"np": np.float32(0.5), "i": np.int64(3), "t": torch.tensor(2.5),
                     "nan": math.nan, "flag": True},
            held=bool(np.bool_(True)),
            params={"arr": np.arange(3), "path": tmp_path},
        )

    opts = (Option("--size", type=int, default=1, help="a size"), Option("--label", default="x"))
    _use(monkeypatch, _fake(run, opts))
    assert cli.main(["run", "fake", "--quick", "--json", "--size", "7",
                     "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1
    obj = json.loads(captured.out)
    assert obj["metrics"] == {"np": 0.5, "i": 3, "t": 2.5, "nan": None, "flag": 1}
    assert obj["verdict"] == "held"
    assert obj["params"] == {"arr": [0, 1, 2], "path": str(tmp_path)}
    assert "chatter" in captured.err


def test_readable_summary_without_json(monkeypatch, capsys, tmp_path):
    def run(ctx):
        return Result(metrics={"err": 1e-12}, held=False,
                      table=[{"L": 8, "seconds": 0.25}, {"L": 16, "seconds": 0.5}], notes="n")

    _use(monkeypatch, _fake(run))
    assert cli.main(["run", "fake", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fake: NOT HELD" in out
    assert "err" in out and "1e-12" in out
    assert "seconds" in out and "0.25" in out


def test_missing_required_option_is_a_usage_error(monkeypatch, capsys):
    _use(monkeypatch, _fake(lambda ctx: None, (Option("--fasta", required=True, help="file"),)))
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "fake", "--json"])
    assert exc.value.code == 2
    assert "--fasta" in capsys.readouterr().err


def test_experiment_that_raises_exits_1_with_error_json(monkeypatch, capsys, tmp_path):
    def run(ctx):
        raise RuntimeError("kaboom")

    _use(monkeypatch, _fake(run))
    assert cli.main(["run", "fake", "--json", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    obj = json.loads(captured.out.strip().splitlines()[-1])
    assert obj["verdict"] == "not held" and "kaboom" in obj["error"]
    assert JSON_KEYS <= set(obj)
    assert "kaboom" in captured.err


def test_non_numeric_metric_is_rejected(monkeypatch, capsys, tmp_path):
    _use(monkeypatch, _fake(lambda ctx: Result(metrics={"bad": "text"}, held=True)))
    assert cli.main(["run", "fake", "--json", "--out", str(tmp_path)]) == 1
    assert "metric 'bad' must be a number" in capsys.readouterr().err
