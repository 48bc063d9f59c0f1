"""Running experiments and turning their results into JSON and an HTML report.

The JSON object of one experiment has a fixed shape (scripts and checks rely on it)::

    {"name", "claim", "verdict": "held" | "not held" | "inconclusive",
     "decisions": [{"name", "value", "ci_low", "ci_high", "threshold", "direction",
                    "margin", "outcome", "note"}],
     "metrics": {flat name -> number}, "params": {...}, "figures": [paths], "seconds",
     "table": [rows], "notes"}

plus ``"error"`` (a traceback) when the experiment raised. Metric values are JSON numbers;
NaN and infinities become ``null``. ``attnkit run NAME --json`` adds ``"env"`` (the provenance,
:mod:`.provenance`).

A report's ``results.json`` is one object (:func:`report_document`)::

    {"env": {...provenance...}, "quick": bool,
     "status": "running" | "complete" | "interrupted", "experiments": [one object each]}

In it, an experiment skipped for lack of a required option has ``"verdict": "not run"`` and
``"skipped": "needs --flag"``. Every file is written atomically (:mod:`.io`), and a report that
did not finish is never "complete".
"""

from __future__ import annotations

import contextlib
import html
import importlib
import json
import math
import numbers
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .io import atomic_write_bytes, atomic_write_text
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
    "report_document",
    "load_results",
    "ReportInterrupted",
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

#: ``status`` of ``results.json``: written as "running" before the first experiment (replacing
#: the previous run's files at once), "complete" after the last, "interrupted" when the run was
#: stopped by SIGINT / SIGTERM. A run killed outright (SIGKILL, power loss) stays "running":
#: the page then says it is incomplete.
RUNNING, COMPLETE, INTERRUPTED = "running", "complete", "interrupted"


class ReportInterrupted(BaseException):
    """Raised inside :func:`run_report` by the SIGTERM handler (SIGINT raises
    ``KeyboardInterrupt``); the report is marked "interrupted" before it propagates."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


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
            if p.is_file():
                atomic_write_bytes(target, p.read_bytes())
            rel = target.resolve().relative_to(out_dir.resolve())
        paths.append(rel.as_posix())
    return paths


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`ReportInterrupted` (so ``finally`` blocks run
    and the report can mark itself interrupted); outside the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise ReportInterrupted(signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def report_document(entries: Sequence[Mapping[str, Any]], *, env: Mapping[str, Any],
                    quick: bool, status: str) -> dict[str, Any]:
    """The object of ``results.json``: ``{"env", "quick", "status", "experiments"}``."""
    if status not in (RUNNING, COMPLETE, INTERRUPTED):
        raise ValueError(f"status must be running, complete or interrupted, got {status!r}")
    return {"env": to_jsonable(dict(env)), "quick": bool(quick), "status": status,
            "experiments": list(entries)}


def run_report(
    out_dir: Path | str = "report",
    *,
    quick: bool = False,
    experiments: Mapping[str, Experiment] | None = None,
    only: Sequence[str] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run every experiment (or those in ``only``) and write ``index.html`` and
    ``results.json`` (:func:`report_document`) into ``out_dir``; each experiment writes its
    figures into ``out_dir/<name>/``. An experiment that raises is recorded (verdict "not
    held", ``"error"`` holding the traceback) and the report goes on; one with a required
    option missing is listed as not run. Returns the experiments' list.

    Crash safety: every file is written to a temporary file and renamed into place; the report
    is written with status "running" before the first experiment and after each one, and
    "complete" at the end; SIGINT / SIGTERM mark it "interrupted" and the exception goes on.
    """
    from .provenance import environment

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

    env = environment()
    entries: list[dict[str, Any]] = []
    for module, tb in broken:
        entries.append({
            "name": module, "claim": f"(module {module} failed to import)", "verdict": NOT_HELD,
            "decisions": [], "metrics": {}, "params": {}, "figures": [], "seconds": 0.0,
            "table": [],
            "notes": "", "error": tb,
        })
    pending = list(experiments)

    def write(status: str) -> None:
        _write(out_dir, report_document(entries, env=env, quick=quick, status=status),
               pending=pending)

    with _sigterm_raises():
        try:
            # Replace the previous run's files at once: an older report never looks current.
            write(RUNNING)
            for exp in _progress(list(experiments.values())):
                entries.append(_run_one(exp, out_dir, quick=quick, seed=seed))
                pending.remove(exp.name)
                # Write as we go: a report interrupted late still has everything finished.
                write(RUNNING)
        except BaseException:
            with contextlib.suppress(Exception):
                write(INTERRUPTED)
            raise
        write(COMPLETE)
    return entries


def _run_one(exp: Experiment, out_dir: Path, *, quick: bool, seed: int) -> dict[str, Any]:
    """The JSON object of one experiment of a report (run, raised or skipped)."""
    options = default_options(exp)
    missing = missing_required(exp, options)
    if missing:
        return skipped_dict(exp, missing)
    exp_dir = out_dir / exp.name
    t0 = time.perf_counter()
    try:
        result, seconds = run_experiment(exp, quick=quick, out_dir=exp_dir, options=options,
                                         seed=seed)
        figures = _portable_figures(result.figures, exp_dir, out_dir)
        return result_dict(exp, result, seconds, figures)
    except Exception:
        return error_dict(exp, traceback.format_exc(), time.perf_counter() - t0)


def _write(out_dir: Path, doc: Mapping[str, Any], pending: Sequence[str] = ()) -> None:
    """``index.html`` then ``results.json``, each written atomically: the JSON (what readers and
    a resumed run poll) is the commit point, so whatever state it records, the page shows it
    too, also when the process is killed between the two writes."""
    atomic_write_text(out_dir / "index.html",
                      render_html(doc["experiments"], quick=doc["quick"], env=doc["env"],
                                  status=doc["status"], pending=pending))
    atomic_write_text(out_dir / "results.json",
                      json.dumps(doc, indent=2, allow_nan=False) + "\n")


def load_results(path: Path | str) -> dict[str, Any]:
    """Read a report's ``results.json`` (or its folder): the :func:`report_document` object.
    ``ValueError`` when it is not one (e.g. the list written by attnkit before 0.2)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not {"env", "quick", "status", "experiments"} <= set(doc):
        raise ValueError(f"{path}: not an attnkit results.json (expected an object with env, "
                         "quick, status and experiments)")
    return doc


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


# Tables fit the page: long names wrap anywhere, numbers do not; no scroll boxes.
_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2.2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 13px; max-width: 100%; }
table.full { width: 100%; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; vertical-align: top;
         overflow-wrap: anywhere; }
th { background: #f4f4f4; overflow-wrap: normal; } td.text, th.text { text-align: left; }
td.num { white-space: nowrap; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 10px; color: #fff;
         font-size: 13px; font-weight: 600; white-space: nowrap; }
.held { background: #2e7d32; } .inconclusive { background: #b26a00; }
.not-held { background: #c62828; } .not-run { background: #777; }
tr.row-inconclusive td { background: #fff4e0; } tr.row-not-held td { background: #fdecea; }
tr.row-inconclusive td.outcome { color: #b26a00; font-weight: 600; }
td.outcome { white-space: nowrap; }
.claim { font-style: italic; } .muted { color: #666; font-size: 13px; }
.banner { border: 2px solid #b26a00; background: #fff4e0; padding: 0.6em 1em; font-weight: 600; }
.banner.interrupted { border-color: #c62828; background: #fdecea; }
dl.env { display: grid; grid-template-columns: max-content 1fr; gap: 0 1em; font-size: 13px; }
dl.env dt { color: #666; } dl.env dd { margin: 0; overflow-wrap: anywhere; }
pre { background: #f7f7f7; padding: 0.7em; white-space: pre-wrap; overflow-wrap: anywhere;
      font-size: 12px; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
.notes { white-space: pre-line; }
a.top { font-size: 13px; float: right; font-weight: normal; }
"""

# Records images that did not load into the page itself (``data-broken-images``), so a
# headless browser's DOM dump shows them (tests/test_report_browser.py).
_IMAGE_CHECK = """
window.addEventListener("load", function () {
  var bad = [];
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    if (!im.complete || im.naturalWidth === 0) bad.push(im.getAttribute("src"));
  }
  document.body.setAttribute("data-images", String(document.images.length));
  document.body.setAttribute("data-broken-images", bad.join(" "));
});
"""

_STATUS_TEXT = {
    RUNNING: "This report is incomplete: the run was interrupted or is still going.",
    INTERRUPTED: "This report is incomplete: the run was interrupted.",
}


def _verdict_class(verdict: Any) -> str:
    return {HELD: "held", NOT_RUN: "not-run", INCONCLUSIVE: "inconclusive"}.get(verdict,
                                                                               "not-held")


def _badge(entry: Mapping[str, Any]) -> str:
    verdict = entry.get("verdict", NOT_HELD)
    text = verdict + (" (error)" if "error" in entry else "")
    if "skipped" in entry:
        text = f"not run ({entry['skipped']})"
    return f'<span class="badge {_verdict_class(verdict)}">{_e(text)}</span>'


def _cell(value: Any) -> str:
    cls = "num" if isinstance(value, numbers.Number) or value is None else "text"
    return f'<td class="{cls}">{_e(fmt(value))}</td>'


def _table_html(columns: Sequence[str], rows: Sequence[Mapping[str, Any]],
                cls: str = "") -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows
    )
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _ci_text(d: Mapping[str, Any]) -> str:
    return f"{fmt(d.get('value'))} [{fmt(d.get('ci_low'))}, {fmt(d.get('ci_high'))}]"


def _decision_table(decisions: Sequence[Mapping[str, Any]]) -> str:
    """The deciding quantities of one experiment: estimate, 95% CI, threshold, margin."""
    rows = []
    for d in decisions:
        outcome = str(d.get("outcome", ""))
        rows.append(
            f'<tr class="row-{_verdict_class(outcome)}"><td class="text">{_e(d.get("name"))}</td>'
            f'{_cell(d.get("value"))}<td class="num">[{_e(fmt(d.get("ci_low")))}, '
            f'{_e(fmt(d.get("ci_high")))}]</td>'
            f'<td class="num">{_e(d.get("direction"))} {_e(fmt(d.get("threshold")))}</td>'
            f'{_cell(d.get("margin"))}<td class="text outcome">{_e(outcome)}</td>'
            f'<td class="text">{_e(d.get("note", ""))}</td></tr>'
        )
    head = ("<tr><th class=text>deciding quantity</th><th>value</th><th>95% CI</th>"
            "<th>claim says</th><th>margin</th><th class=text>outcome</th>"
            "<th class=text>note</th></tr>")
    return f'<table class="full decisions">{head}{"".join(rows)}</table>'


def _anchor(name: str) -> str:
    return "exp-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)


def _env_html(env: Mapping[str, Any]) -> str:
    if not env:
        return ""
    items = dict(env)
    kernels = items.pop("kernels", None)
    commit = items.pop("git_commit", None)
    dirty = items.pop("git_dirty", None)
    if commit:
        items["git commit"] = commit + (" (with uncommitted changes)" if dirty else "")
    else:
        items["git commit"] = "not run from a git checkout"
    if isinstance(kernels, Mapping):
        items["compiled kernels"] = ", ".join(
            f"{k}: {'in use' if v.get('available') else 'off (' + str(v.get('reason')) + ')'}"
            if isinstance(v, Mapping) else f"{k}: {v}" for k, v in kernels.items())
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(fmt(v))}</dd>" for k, v in items.items())
    return f'<dl class="env">{rows}</dl>'


def _summary_html(entries: Sequence[Mapping[str, Any]]) -> str:
    """One row per deciding quantity (the experiment's cells span its rows)."""
    parts = ["<table class=\"full summary\"><tr><th class=text>experiment</th><th>verdict</th>"
             "<th class=text>claim</th><th class=text>deciding quantity</th>"
             "<th>value [95% CI]</th><th>claim says</th><th>margin</th></tr>"]
    for e in entries:
        name = str(e.get("name"))
        decisions = list(e.get("decisions") or [])
        span = max(1, len(decisions))
        lead = (f'<td class="text" rowspan="{span}"><a href="#{_e(_anchor(name))}">{_e(name)}'
                f'</a></td><td rowspan="{span}">{_badge(e)}</td>'
                f'<td class="text" rowspan="{span}">{_e(e.get("claim", ""))}</td>')
        if not decisions:
            parts.append(f"<tr>{lead}<td class=text colspan=4>\u2014</td></tr>")
            continue
        for i, d in enumerate(decisions):
            parts.append(
                f'<tr class="row-{_verdict_class(d.get("outcome"))}">{lead if i == 0 else ""}'
                f'<td class="text">{_e(d.get("name"))}</td><td class="num">{_e(_ci_text(d))}</td>'
                f'<td class="num">{_e(d.get("direction"))} {_e(fmt(d.get("threshold")))}</td>'
                f'{_cell(d.get("margin"))}</tr>'
            )
    parts.append("</table>")
    return "".join(parts)


def render_html(entries: Sequence[Mapping[str, Any]], *, quick: bool = False,
                env: Mapping[str, Any] | None = None, status: str = COMPLETE,
                pending: Sequence[str] = ()) -> str:
    """The report page: provenance and a summary of the deciding numbers, then one section
    per experiment (decision table, figures, metrics, measurements, notes). A report whose
    ``status`` is not "complete" carries a banner saying so. All text is escaped."""
    held = sum(e.get("verdict") == HELD for e in entries)
    started = (env or {}).get("started") or time.strftime("%Y-%m-%d %H:%M:%S %Z")
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>attnkit report</title>",
        f"<style>{_CSS}</style><script>{_IMAGE_CHECK}</script></head>",
        f'<body data-status="{_e(status)}">',
        '<h1 id="top">attnkit report</h1>',
    ]
    if status != COMPLETE:
        parts.append(f'<p class="banner {_e(status)}" id="status-banner">'
                     f'{_e(_STATUS_TEXT.get(status, status))}'
                     + (f" Not run yet: {_e(', '.join(pending))}." if pending else "") + "</p>")
    parts.append(
        f'<p class="muted">started {_e(started)} · {"quick mode" if quick else "full mode"} · '
        f'{held} of {len(entries)} claims held · status: {_e(status)}</p>')
    parts.append(_env_html(env or {}))
    parts.append("<h2 id=summary>Summary</h2>")
    parts.append('<p class="muted">A claim is held when every deciding quantity\'s 95% CI lies '
                 "on the claim's side of its threshold, not held when one lies wholly on the "
                 "other side, inconclusive otherwise. The margin is the distance from the "
                 "threshold to the CI's nearer end (positive: on the claim's side): how far "
                 "the interval would have to move to change the outcome.</p>")
    parts.append(_summary_html(entries))

    for e in entries:
        name = str(e.get("name"))
        parts.append(f'<section class="experiment" id="{_e(_anchor(name))}">')
        parts.append(f'<h2>{_e(name)} {_badge(e)} <a class="top" href="#top">back to top</a>'
                     "</h2>")
        parts.append(f'<p class="claim">{_e(e.get("claim", ""))}</p>')
        if "skipped" in e:
            parts.append(f"<p>Not run: {_e(e['skipped'])} (see <code>attnkit run "
                         f"{_e(name)} --help</code>).</p></section>")
            continue
        seeds = (e.get("metrics") or {}).get("seeds")
        parts.append(f'<p class="muted">{_e(fmt(e.get("seconds")))} s'
                     + (f" · {_e(fmt(seeds))} seeds" if seeds is not None else "") + "</p>")
        if "error" in e:
            parts.append(f"<p>The experiment raised:</p><pre>{_e(e['error'])}</pre>")
        decisions = e.get("decisions") or []
        if decisions:
            parts.append("<h3>Decision</h3>")
            parts.append(_decision_table(decisions))
        for fig in e.get("figures") or []:
            parts.append(f'<div><img src="{_e(fig)}" alt="{_e(Path(str(fig)).name)}"></div>')
        if e.get("notes"):
            parts.append(f'<p class="notes">{_e(e["notes"])}</p>')
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
        if e.get("params"):
            parts.append(f'<p class="muted">params: {_e(json.dumps(e["params"]))}</p>')
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
