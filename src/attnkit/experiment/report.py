"""Running experiments and turning their results into JSON and an HTML report.

The JSON object of one experiment has a fixed shape (scripts and checks rely on it)::

    {"name", "claim", "verdict": "held" | "not held" | "inconclusive",
     "decisions": [{"name", "value", "ci_low", "ci_high", "threshold", "direction",
                    "margin", "outcome", "note"}],
     "metrics": {flat name -> number}, "params": {...}, "figures": [paths], "seconds",
     "table": [rows], "notes"}

plus ``"error"`` (a traceback) when the experiment raised. Metric values are JSON numbers;
NaN and infinities become ``null``. In ``results.json`` of a report, an experiment skipped for
lack of a required option has ``"verdict": "not run"`` and ``"skipped": "needs --flag"``.
"""

from __future__ import annotations

import contextlib
import html
import importlib
import json
import math
import numbers
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .types import HELD, INCONCLUSIVE, NOT_HELD, NOT_RUN, Experiment, Result, RunContext

__all__ = [
    "collect_experiments",
    "missing_required",
    "result_dict",
    "error_dict",
    "run_experiment",
    "run_report",
    "render_html",
    "to_jsonable",
]

__all__ += ["HELD", "INCONCLUSIVE", "NOT_HELD", "NOT_RUN"]


# ---------------------------------------------------------------------------- JSON values


def _scalar(x: Any) -> Any:
    """numpy / torch scalars (and one-element arrays/tensors) as Python numbers, else ``x``."""
    if hasattr(x, "item") and callable(x.item) and getattr(x, "size", 1) in (1, None):
        try:
            return x.item()
        except (TypeError, ValueError, RuntimeError):
            return x
    if hasattr(x, "numel") and callable(x.numel) and x.numel() == 1:
        return x.item()
    return x


def to_jsonable(x: Any) -> Any:
    """Convert ``x`` into plain JSON values: numbers, strings, lists, dicts, ``None``.

    numpy / torch scalars become Python numbers, arrays and tensors lists, paths strings,
    NaN / inf ``None``; anything else unknown becomes its ``str``.
    """
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        f = float(x)
        return f if math.isfinite(f) else None
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in x]
    y = _scalar(x)
    if y is not x:
        return to_jsonable(y)
    if hasattr(x, "tolist") and callable(x.tolist):  # numpy arrays, torch tensors
        return to_jsonable(x.tolist())
    return str(x)


def _metric(name: str, value: Any) -> int | float | None:
    """A metric as a JSON number (``None`` for NaN / inf); ``TypeError`` if not a number."""
    value = _scalar(value)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else None
    raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}: {value!r}")


# --------------------------------------------------------------------------- result dicts


def result_dict(
    exp: Experiment, result: Result, seconds: float, figures: Sequence[str] | None = None
) -> dict[str, Any]:
    """The fixed-shape JSON object of one run (``figures`` overrides ``result.figures``)."""
    if not isinstance(result, Result):
        raise TypeError(
            f"experiment {exp.name!r} must return an attnkit.experiment.Result, "
            f"got {type(result).__name__}"
        )
    if not isinstance(result.metrics, Mapping):
        raise TypeError(f"experiment {exp.name!r}: metrics must be a dict of name -> number")
    notes = str(result.notes or "")
    nan_notes = [d.explanation() for d in result.decisions if d.nan_fields]
    if nan_notes:
        notes = "\n".join([notes, *nan_notes]).strip()
    return {
        "name": exp.name,
        "claim": exp.claim,
        "verdict": result.verdict,
        "decisions": [d.to_dict() for d in result.decisions],
        "metrics": {str(k): _metric(str(k), v) for k, v in result.all_metrics().items()},
        "params": to_jsonable(dict(result.params)),
        "figures": [os.fspath(f) for f in (result.figures if figures is None else figures)],
        "seconds": round(float(seconds), 3),
        "table": to_jsonable(list(result.table)),
        "notes": notes,
    }


def error_dict(exp: Experiment, error: str, seconds: float) -> dict[str, Any]:
    """The JSON object of a run that raised: verdict "not held" and the traceback."""
    return {
        "name": exp.name,
        "claim": exp.claim,
        "verdict": NOT_HELD,
        "decisions": [],
        "metrics": {},
        "params": {},
        "figures": [],
        "seconds": round(float(seconds), 3),
        "table": [],
        "notes": "",
        "error": error,
    }


def skipped_dict(exp: Experiment, missing: Sequence[str]) -> dict[str, Any]:
    return {
        "name": exp.name,
        "claim": exp.claim,
        "verdict": NOT_RUN,
        "decisions": [],
        "metrics": {},
        "params": {},
        "figures": [],
        "seconds": 0.0,
        "table": [],
        "notes": "",
        "skipped": "needs " + " ".join(missing),
    }


def missing_required(exp: Experiment, options: Mapping[str, Any]) -> list[str]:
    """Flags of required options that have no value in ``options``."""
    return [o.flag for o in exp.options if o.required and options.get(o.dest) is None]


def default_options(exp: Experiment) -> dict[str, Any]:
    return {o.dest: o.default for o in exp.options}


def run_experiment(
    exp: Experiment,
    *,
    quick: bool,
    out_dir: Path,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[Result, float]:
    """Run one experiment; returns ``(result, seconds)``. Exceptions propagate.

    Anything the experiment prints to stdout goes to stderr instead: stdout carries the JSON.
    """
    ctx = RunContext(quick=quick, out_dir=Path(out_dir), options=dict(options or {}), seed=seed)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        result = exp.run(ctx)
    return result, time.perf_counter() - t0


# ------------------------------------------------------------------------------ registry


def collect_experiments() -> tuple[dict[str, Experiment], list[tuple[str, str]]]:
    """Registered experiments, and ``(module, traceback)`` for application modules that fail
    to import (so one broken application does not hide the others)."""
    from . import registry as experiments

    try:
        return experiments.registry(), []
    except Exception:  # isolate the failing module(s) instead of losing every experiment
        pass
    found: dict[str, Experiment] = {}
    broken: list[tuple[str, str]] = []
    for path in experiments.MODULES:
        try:
            mod = importlib.import_module(path)
        except ModuleNotFoundError as e:
            if e.name and (e.name == path or path.startswith(e.name + ".")):
                continue  # not written yet
            broken.append((path, traceback.format_exc()))
            continue
        except Exception:
            broken.append((path, traceback.format_exc()))
            continue
        for exp in getattr(mod, "EXPERIMENTS", None) or [getattr(mod, "EXPERIMENT", None)]:
            if isinstance(exp, Experiment):
                found[exp.name] = exp
            else:
                broken.append((path, f"{path} defines no EXPERIMENT / EXPERIMENTS"))
    return found, broken


# -------------------------------------------------------------------------------- report


def _progress(items: Sequence[Experiment]) -> Iterator[Experiment]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        for i, exp in enumerate(items, 1):
            print(f"[{i}/{len(items)}] {exp.name}", file=sys.stderr, flush=True)
            yield exp
        return
    bar = tqdm(items, desc="report", file=sys.stderr, unit="exp")
    for exp in bar:
        bar.set_postfix_str(exp.name)
        yield exp


def _portable_figures(figures: Iterable[Any], exp_dir: Path, out_dir: Path) -> list[str]:
    """Figure paths relative to ``out_dir`` (copied into ``exp_dir`` when written elsewhere)."""
    paths = []
    for f in figures:
        p = Path(f)
        if not p.is_absolute():
            p = Path.cwd() / p
        try:
            rel = p.resolve().relative_to(out_dir.resolve())
        except ValueError:
            target = exp_dir / p.name
            exp_dir.mkdir(parents=True, exist_ok=True)
            if p.is_file():
                shutil.copyfile(p, target)
            rel = target.resolve().relative_to(out_dir.resolve())
        paths.append(rel.as_posix())
    return paths


def run_report(
    out_dir: Path | str = "report",
    *,
    quick: bool = False,
    experiments: Mapping[str, Experiment] | None = None,
    only: Sequence[str] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run every experiment (or those in ``only``) and write ``index.html`` and
    ``results.json`` into ``out_dir``; each experiment writes its figures into
    ``out_dir/<name>/``. An experiment that raises is recorded (verdict "not held", ``"error"``
    holding the traceback) and the report goes on; one with a required option missing is listed
    as not run. Returns the list written to ``results.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    broken: list[tuple[str, str]] = []
    if experiments is None:
        experiments, broken = collect_experiments()
    if only:
        unknown = [n for n in only if n not in experiments]
        if unknown:
            raise ValueError(
                f"unknown experiment(s) {', '.join(unknown)}; known: {', '.join(experiments)}"
            )
        experiments = {n: experiments[n] for n in only}

    entries: list[dict[str, Any]] = []
    for module, tb in broken:
        entries.append({
            "name": module, "claim": f"(module {module} failed to import)", "verdict": NOT_HELD,
            "decisions": [], "metrics": {}, "params": {}, "figures": [], "seconds": 0.0,
            "table": [],
            "notes": "", "error": tb,
        })
    for exp in _progress(list(experiments.values())):
        options = default_options(exp)
        missing = missing_required(exp, options)
        if missing:
            entries.append(skipped_dict(exp, missing))
            continue
        exp_dir = out_dir / exp.name
        t0 = time.perf_counter()
        try:
            result, seconds = run_experiment(exp, quick=quick, out_dir=exp_dir, options=options,
                                             seed=seed)
            figures = _portable_figures(result.figures, exp_dir, out_dir)
            entries.append(result_dict(exp, result, seconds, figures))
        except Exception:
            entries.append(error_dict(exp, traceback.format_exc(), time.perf_counter() - t0))
        # Write as we go: a report interrupted late still has everything finished so far.
        _write(out_dir, entries, quick)
    _write(out_dir, entries, quick)
    return entries


def _write(out_dir: Path, entries: list[dict[str, Any]], quick: bool) -> None:
    (out_dir / "results.json").write_text(
        json.dumps(entries, indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    (out_dir / "index.html").write_text(render_html(entries, quick=quick), encoding="utf-8")


# ---------------------------------------------------------------------------------- HTML


def fmt(value: Any) -> str:
    """A table cell: numbers to 4 significant digits, ``None`` as an em dash."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        f = float(value)
        if not math.isfinite(f):
            return str(f)
        return f"{f:.4g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def group_rows(rows: Sequence[Mapping[str, Any]]) -> list[tuple[list[str], list[Mapping]]]:
    """Consecutive rows with the same keys form one table: ``[(columns, rows), ...]``."""
    groups: list[tuple[list[str], list[Mapping]]] = []
    for row in rows:
        cols = list(row.keys())
        if groups and groups[-1][0] == cols:
            groups[-1][1].append(row)
        else:
            groups.append((cols, [row]))
    return groups


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 10px; color: #fff;
         font-size: 13px; font-weight: 600; }
.held { background: #2e7d32; } .inconclusive { background: #b26a00; }
.not-held { background: #c62828; } .not-run { background: #777; }
.claim { font-style: italic; } .muted { color: #666; font-size: 13px; }
pre { background: #f7f7f7; padding: 0.7em; overflow-x: auto; font-size: 12px; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
.scroll { max-height: 420px; overflow: auto; display: inline-block; }
"""


def _badge(entry: Mapping[str, Any]) -> str:
    verdict = entry.get("verdict", NOT_HELD)
    cls = {HELD: "held", NOT_RUN: "not-run", INCONCLUSIVE: "inconclusive"}.get(verdict,
                                                                                "not-held")
    text = verdict + (" (error)" if "error" in entry else "")
    if "skipped" in entry:
        text = f"not run ({entry['skipped']})"
    return f'<span class="badge {cls}">{_e(text)}</span>'


def _table_html(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _anchor(name: str) -> str:
    return "exp-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)


def render_html(entries: Sequence[Mapping[str, Any]], *, quick: bool = False) -> str:
    """The report page: a summary table, then one section per experiment. All text escaped."""
    held = sum(e.get("verdict") == HELD for e in entries)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>attnkit report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>attnkit report</h1>",
        f'<p class="muted">{_e(time.strftime("%Y-%m-%d %H:%M:%S %Z"))} · '
        f'{"quick mode" if quick else "full mode"} · {held} of {len(entries)} claims held</p>',
        "<table><tr><th>experiment</th><th>verdict</th><th>seconds</th><th>claim</th></tr>",
    ]
    for e in entries:
        parts.append(
            f'<tr><td><a href="#{_e(_anchor(str(e.get("name"))))}">{_e(e.get("name"))}</a></td>'
            f"<td>{_badge(e)}</td><td>{_e(fmt(e.get('seconds')))}</td>"
            f'<td style="text-align:left">{_e(e.get("claim", ""))}</td></tr>'
        )
    parts.append("</table>")

    for e in entries:
        name = str(e.get("name"))
        parts.append(f'<h2 id="{_e(_anchor(name))}">{_e(name)} {_badge(e)}</h2>')
        parts.append(f'<p class="claim">{_e(e.get("claim", ""))}</p>')
        if "skipped" in e:
            parts.append(f"<p>Not run: {_e(e['skipped'])} (see <code>attnkit run "
                         f"{_e(name)} --help</code>).</p>")
            continue
        parts.append(f'<p class="muted">{_e(fmt(e.get("seconds")))} s</p>')
        if "error" in e:
            parts.append(f"<p>The experiment raised:</p><pre>{_e(e['error'])}</pre>")
        decisions = e.get("decisions") or []
        if decisions:
            parts.append("<h3>Decision</h3>")
            cols = ["name", "value", "ci_low", "ci_high", "direction", "threshold", "margin",
                    "outcome"]
            parts.append(_table_html(cols, decisions))
        metrics = e.get("metrics") or {}
        if metrics:
            parts.append("<h3>Metrics</h3>")
            parts.append(_table_html(["metric", "value"],
                                     [{"metric": k, "value": v} for k, v in metrics.items()]))
        rows = e.get("table") or []
        if rows:
            parts.append("<h3>Measurements</h3>")
            for cols, group in group_rows(rows):
                parts.append(_table_html(cols, group))
        for fig in e.get("figures") or []:
            parts.append(f'<div><img src="{_e(fig)}" alt="{_e(Path(str(fig)).name)}"></div>')
        if e.get("notes"):
            parts.append(f"<p>{_e(e['notes'])}</p>")
        if e.get("params"):
            parts.append(f'<p class="muted">params: {_e(json.dumps(e["params"]))}</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
