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
    # no sparse size <= 1024: the slopes cannot be fitted, so the verdict is inconclusive
    assert obj["verdict"] == "inconclusive"
    assert obj["env"]["attnkit"] and obj["env"]["torch"] and obj["env"]["threads"] >= 1
    assert set(obj["env"]["kernels"]) == {"band", "decode", "short", "gemv", "step"}
    assert json.loads((tmp_path / "result.json").read_text()) == obj
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


# ------------------------------------------------------------------ conventions (subprocess)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _attnkit(*args: str, stdout=subprocess.PIPE, timeout: float = 300):
    """``python -m attnkit ARGS`` in a fresh process, with this checkout's sources."""
    import os

    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "attnkit", *args], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=timeout, env=env)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnkit: error: "), proc.stderr
    return lines[0]


def test_version():
    import attnkit

    proc = _attnkit("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"attnkit {attnkit.__version__}"


def test_list_json():
    proc = _attnkit("list", "--json")
    assert proc.returncode == 0, proc.stderr
    items = json.loads(proc.stdout)
    by_name = {e["name"]: e for e in items}
    assert "engine" in by_name and "planetoid" in by_name
    assert all(set(e) == {"name", "claim", "description", "options"} for e in items)
    data_dir = next(o for o in by_name["planetoid"]["options"] if o["flag"] == "--data-dir")
    assert data_dir["required"] and data_dir["type"] == "DIR"


def test_closed_stdout_pipe_exits_quietly():
    import os

    read, write = os.pipe()
    os.close(read)  # nobody reads: the first write fails with EPIPE
    try:
        proc = _attnkit("list", stdout=write)
    finally:
        os.close(write)
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == 141


def test_missing_data_dir_is_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "nonexistent"
    line = _one_error_line(_attnkit("run", "planetoid", "--data-dir", str(missing),
                                    "--out", str(tmp_path / "o")))
    assert str(missing) in line
    empty = tmp_path / "empty"  # exists, so the option passes; the files are missing at run time
    empty.mkdir()
    assert "ind.cora" in _one_error_line(_attnkit("run", "planetoid", "--data-dir", str(empty),
                                                  "--out", str(tmp_path / "o")))
    debug = _attnkit("--debug", "run", "planetoid", "--data-dir", str(empty),
                     "--out", str(tmp_path / "o"))
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("attnkit: error: ")


def test_bad_option_values_are_one_line():
    assert "--instances" in _one_error_line(_attnkit("run", "knapsack", "--instances", "x"))
    assert "--nope" in _one_error_line(_attnkit("run", "engine", "--nope"))
    assert "unknown experiment" in _one_error_line(_attnkit("run", "no-such"))
    _one_error_line(_attnkit("frobnicate"))


def test_option_validator_errors_keep_their_message(monkeypatch, capsys, tmp_path):
    """ValueError / TypeError / OSError from an Option's type: one line with the message."""
    def must_exist(text):
        return Path(text).open().close() or Path(text)

    def positive(text):
        if int(text) <= 0:
            raise ValueError(f"must be a positive int, got {text}")
        return int(text)

    opts = (Option("--data", type=must_exist, help="input file"),
            Option("--n", type=positive, help="count"))
    _use(monkeypatch, _fake(lambda ctx: Result(metrics={}, held=True), opts))
    for argv, needle in ((["--data", str(tmp_path / "missing.txt")], "missing.txt"),
                         (["--n", "-3"], "must be a positive int, got -3")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["run", "fake", *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("attnkit: error: ") and needle in err[0]


def test_experiment_raising_oserror_is_a_usage_error(monkeypatch, capsys, tmp_path):
    def run(ctx):
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "x.paj"))

    _use(monkeypatch, _fake(run))
    assert cli.main(["run", "fake", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"attnkit: error: fake: [Errno 2] No such file or directory: "
                   f"'{tmp_path / 'x.paj'}'"]


def test_help_metavars_and_no_internal_references(capsys):
    experiments = cli._load()
    texts = [cli.build_parser().format_help()]
    texts += [cli.experiment_parser(exp).format_help() for exp in experiments.values()]
    for text in texts:
        assert "issue" not in text.lower(), text
        assert " STR" not in text, text
    planetoid = cli.experiment_parser(experiments["planetoid"]).format_help()
    assert "--data-dir DIR" in planetoid and "--out DIR" in planetoid
    assert "--fasta PATH" in cli.experiment_parser(experiments["genome"]).format_help()
    assert "--foodweb PATH" in cli.experiment_parser(experiments["foodweb"]).format_help()
