"""The ``attnkit`` command (also ``python -m attnkit``).

    attnkit list [--json]                          every experiment and its claim
    attnkit run NAME [--quick] [--json] [--out DIR] [the experiment's own options]
    attnkit run NAME --help                        the experiment's own options
    attnkit report [--quick] [--out DIR] [--only NAME ...] [--strict]
    attnkit --version

Errors of usage (a bad option value, a missing or unreadable file or directory, missing data)
print one line ``attnkit: error: ...`` on stderr and exit 2; ``--debug`` (anywhere on the
command line) shows the traceback too. A closed stdout (``attnkit list | head -1``) ends the
command quietly.

``run --json`` prints the result as one JSON object, the last line on stdout; progress bars and
logs go to stderr. Exit codes: 0 on success (whatever the verdict: "not held" is a result, not
a failure), 1 when the experiment raised, 2 for usage errors (unknown experiment, bad option).
``report`` exits 0 once the report is written, even if experiments raised (each failure is in
the report and summarized on stderr); with ``--strict`` it exits 1 when any experiment raised.
``run --out DIR`` also writes ``DIR/result.json`` (the ``--json`` object, provenance in
``"env"``). ``report`` writes ``results.json`` with status "running" at once, "complete" at the
end, "interrupted" on SIGINT (exit 130) or SIGTERM (exit 143).

Under ``torchrun`` (e.g. ``torchrun --nproc-per-node 2 -m attnkit run genome --quick``),
``run`` and ``report`` join the process group first (:func:`attnkit.distributed.data_parallel.
init_from_env`); every rank runs the experiments (their training loops are data-parallel), and
only rank 0 prints and writes files: the other ranks write figures into a temporary directory
and stay silent, except for the tail of their log when they fail.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .experiment.io import atomic_write_text
from .experiment.provenance import environment
from .experiment.report import (
    HELD,
    NOT_RUN,
    ReportInterrupted,
    collect_experiments,
    error_dict,
    fmt,
    group_rows,
    result_dict,
    run_experiment,
    run_report,
)
from .experiment.types import Experiment, Option

__all__ = ["main", "build_parser"]

#: The exit status of a usage error (as argparse's).
USAGE = 2
#: Errors that, raised while reading the command line or the files it names, are the user's
#: input rather than a failure of attnkit: one line ``attnkit: error: ...``, exit 2.
_INPUT_ERRORS = (OSError, ValueError, TypeError)


def _err(*msg: Any) -> None:
    print(*msg, file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    """An exception as one line (``FileNotFoundError`` keeps its path)."""
    return " ".join(str(e).split()) or type(e).__name__


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``attnkit: error: PROG: MESSAGE (see PROG --help)``."""

    def error(self, message: str):
        _err(f"attnkit: error: {self.prog}: {' '.join(message.split())} "
             f"(see {self.prog} --help)")
        raise SystemExit(USAGE)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="attnkit",
        description="attnkit: exact structure-aware attention and the experiments built on it.",
        epilog="--debug (anywhere on the command line) shows the traceback of an error.",
    )
    parser.add_argument("--version", action="version", version=f"attnkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    lst = sub.add_parser("list", help="list every experiment and its claim")
    lst.add_argument("--json", action="store_true",
                     help="print a JSON array of the experiments (name, claim, options)")
    sub.add_parser(
        "run",
        help="run one experiment: attnkit run NAME [--quick] [--json] [--out DIR] "
        "[options]; attnkit run NAME --help lists its options",
        add_help=False,
    )
    rep = sub.add_parser("report", help="run every experiment and write index.html and "
                         "results.json")
    rep.add_argument("--quick", action="store_true",
                     help="quick mode: about a minute per experiment")
    rep.add_argument("--out", type=Path, default=Path("report"), metavar="DIR",
                     help="output directory (default: report/)")
    rep.add_argument("--only", nargs="+", metavar="NAME", help="run only these experiments")
    rep.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    rep.add_argument("--strict", action="store_true",
                     help="exit 1 when any experiment raised (default: exit 0 once written)")
    return parser


def experiment_parser(exp: Experiment) -> argparse.ArgumentParser:
    """The parser of ``attnkit run NAME``: the common flags plus the experiment's options."""
    parser = _Parser(
        prog=f"attnkit run {exp.name}",
        description=exp.claim,
        epilog=textwrap.dedent(exp.description).strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = parser.add_argument_group("common options")
    common.add_argument("--quick", action="store_true",
                        help="quick mode: about a minute on a laptop CPU")
    common.add_argument("--json", action="store_true",
                        help="print the result as one JSON object (last line on stdout)")
    common.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help=f"directory for figures (default: report/{exp.name})")
    common.add_argument("--seed", type=int, default=0, metavar="N",
                        help="random seed (default 0)")
    if exp.options:
        own = parser.add_argument_group(f"options of {exp.name}")
        for opt in exp.options:
            _add_option(own, opt)
    return parser


def _add_option(group: argparse._ArgumentGroup, opt: Option) -> None:
    help_text = opt.help or ""
    if opt.required:
        help_text += " (required)"
    elif opt.default is not None and "default" not in help_text:
        help_text += f" (default: {opt.default})"
    if opt.type is bool:  # a switch: --flag / --no-flag
        group.add_argument(opt.flag, dest=opt.dest, action=argparse.BooleanOptionalAction,
                           default=opt.default, help=help_text.strip())
        return
    group.add_argument(opt.flag, dest=opt.dest, type=_checked(opt.type), default=opt.default,
                       required=opt.required, help=help_text.strip(), metavar=_metavar(opt))


def _metavar(opt: Option) -> str:
    """The name of an option's value in ``--help`` (see :attr:`Option.metavar`)."""
    given = opt.metavar or getattr(opt.type, "metavar", None)
    if given:
        return str(given)
    words = f"{getattr(opt.type, '__name__', '')} {opt.help}".lower()
    if opt.dest.endswith("dir") or "directory" in getattr(opt.type, "__name__", "").lower():
        return "DIR"
    if opt.type is Path or "file" in words or "path" in words:
        return "PATH"
    return {int: "N", float: "X"}.get(opt.type, "VALUE")


def _checked(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """``convert`` whose ValueError / TypeError / OSError keep their message in argparse's
    one-line error (argparse itself reports only "invalid VALUE" for them, and lets an
    OSError escape as a traceback)."""

    if convert in (int, float, str, Path):  # argparse's own message is the clearer one
        return convert

    def check(text: str) -> Any:
        try:
            return convert(text)
        except argparse.ArgumentTypeError:
            raise
        except _INPUT_ERRORS as e:
            raise argparse.ArgumentTypeError(_one_line(e)) from e

    check.__name__ = getattr(convert, "__name__", "value")
    return check


# -------------------------------------------------------------------------------- commands


def _load() -> dict[str, Experiment]:
    experiments, broken = collect_experiments()
    for module, tb in broken:
        _err(f"attnkit: warning: {module} failed to import; its experiments are unavailable\n"
             f"{tb}")
    return experiments


def cmd_list(experiments: Mapping[str, Experiment], as_json: bool = False) -> int:
    if as_json:
        print(json.dumps([_experiment_dict(exp) for exp in experiments.values()], indent=1))
        return 0
    width = max((len(n) for n in experiments), default=4)
    cols = shutil.get_terminal_size((100, 20)).columns
    for name, exp in experiments.items():
        needs = [o.flag for o in exp.options if o.required]
        claim = exp.claim + (f" [needs {' '.join(needs)}]" if needs else "")
        lines = textwrap.wrap(claim, max(40, cols - width - 3)) or [""]
        print(f"{name:<{width}}   {lines[0]}")
        for line in lines[1:]:
            print(" " * (width + 3) + line)
    return 0


def _experiment_dict(exp: Experiment) -> dict[str, Any]:
    """An experiment as JSON: name, claim, description and its options."""
    def plain(v: Any) -> Any:
        return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)

    return {"name": exp.name, "claim": exp.claim,
            "description": " ".join(exp.description.split()),
            "options": [{"flag": o.flag, "type": "bool" if o.type is bool else _metavar(o),
                         "default": plain(o.default), "required": o.required, "help": o.help}
                        for o in exp.options]}


def _unknown(name: str, experiments: Mapping[str, Experiment]) -> int:
    _err(f"attnkit: error: unknown experiment {name!r}. Known experiments: "
         f"{', '.join(experiments) or '(none)'}")
    return 2


def cmd_run(argv: Sequence[str], experiments: Mapping[str, Experiment],
            out_root: Path | None = None) -> int:
    """``attnkit run``; ``out_root`` replaces ``--out`` by ``out_root / NAME`` (the scratch
    directory of a non-zero rank)."""
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] not in ("-h", "--help"):
            _err("attnkit run: the experiment NAME comes first: attnkit run NAME [options]")
        print("usage: attnkit run NAME [--quick] [--json] [--out DIR] [options]\n\n"
              "experiments: " + (", ".join(experiments) or "(none)") + "\n"
              "attnkit run NAME --help lists the options of one experiment.",
              file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], list(argv[1:])
    if name not in experiments:
        return _unknown(name, experiments)
    exp = experiments[name]
    args = experiment_parser(exp).parse_args(rest)  # exits 2 on bad options, 0 on --help
    options = {o.dest: getattr(args, o.dest) for o in exp.options}
    out_dir = args.out if args.out is not None else Path("report") / exp.name
    if out_root is not None:
        out_dir = out_root / exp.name
    # --out DIR also gets DIR/result.json (the --json object), on the writing rank only.
    result_file = out_dir / "result.json" if args.out is not None and out_root is None else None
    env = environment()
    t0 = time.perf_counter()
    try:
        result, seconds = run_experiment(exp, quick=args.quick, out_dir=out_dir,
                                         options=options, seed=args.seed)
        obj = {**result_dict(exp, result, seconds), "env": env}
    except OSError as e:
        # missing or unreadable data named on the command line: the user's input, not a crash
        if _DEBUG:
            _err(traceback.format_exc())
        _err(f"attnkit: error: {name}: {_one_line(e)}")
        _emit({**error_dict(exp, traceback.format_exc(), time.perf_counter() - t0), "env": env},
              args.json, result_file)
        return USAGE
    except Exception:
        tb = traceback.format_exc()
        _err(tb)
        _err(f"attnkit: experiment {name!r} raised; verdict not held")
        _emit({**error_dict(exp, tb, time.perf_counter() - t0), "env": env}, args.json,
              result_file)
        return 1
    _emit(obj, args.json, result_file)
    if not args.json:
        print(summary_text(obj))
    return 0


def _emit(obj: Mapping[str, Any], as_json: bool, result_file: Path | None) -> None:
    """Write ``obj`` to ``result_file`` (atomically) and, with ``--json``, to stdout."""
    text = json.dumps(obj, allow_nan=False)
    if result_file is not None:
        atomic_write_text(result_file, text + "\n")
    if as_json:
        print(text, flush=True)


def summary_text(obj: Mapping[str, Any]) -> str:
    """A readable multi-line summary of one result dict."""
    cols = shutil.get_terminal_size((100, 20)).columns
    verdict = str(obj["verdict"]).upper()
    lines = [f"{obj['name']}: {verdict}  ({fmt(obj.get('seconds'))} s)"]
    lines += textwrap.wrap("claim: " + str(obj["claim"]), cols, subsequent_indent="  ")
    decisions = obj.get("decisions") or []
    if decisions:
        lines.append("decided by (value [95% CI] vs the claim's threshold):")
        lines += [f"  {d['name']}: {fmt(d.get('value'))} [{fmt(d.get('ci_low'))}, "
                  f"{fmt(d.get('ci_high'))}] {d.get('direction')} {fmt(d.get('threshold'))}"
                  f" -> {d.get('outcome')} (margin {fmt(d.get('margin'))})" for d in decisions]
    metrics = obj.get("metrics") or {}
    if metrics:
        lines.append("metrics:")
        width = max(len(k) for k in metrics)
        lines += [f"  {k:<{width}}  {fmt(v)}" for k, v in metrics.items()]
    for columns, rows in group_rows(obj.get("table") or []):
        cells = [[fmt(r.get(c)) for c in columns] for r in rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        lines.append("")
        lines.append("  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        lines += ["  " + "  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    if obj.get("figures"):
        lines.append("figures:")
        lines += [f"  {f}" for f in obj["figures"]]
    if obj.get("notes"):
        lines += textwrap.wrap("notes: " + str(obj["notes"]), cols, subsequent_indent="  ")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    experiments = _load()
    if args.only:
        unknown = [n for n in args.only if n not in experiments]
        if unknown:
            return _unknown(unknown[0], experiments)
    entries = run_report(args.out, quick=args.quick, experiments=experiments, only=args.only,
                         seed=args.seed)
    held = sum(e["verdict"] == HELD for e in entries)
    skipped = [e for e in entries if e["verdict"] == NOT_RUN]
    failed = [e for e in entries if "error" in e]
    _err(f"attnkit report: {held} of {len(entries)} claims held, {len(failed)} raised, "
         f"{len(skipped)} not run")
    for e in entries:
        _err(f"  {e['name']:<24} {e.get('skipped') or e['verdict']}"
             + ("  (raised: see the report)" if "error" in e else ""))
    for e in failed:
        last = str(e["error"]).strip().splitlines()[-1:] or [""]
        _err(f"attnkit report: {e['name']} raised: {last[0]}")
    print(Path(args.out) / "index.html")
    return 1 if (args.strict and failed) else 0


class _Tail(io.TextIOBase):
    """A text sink that keeps only its last ``limit`` characters (a quiet rank's log)."""

    def __init__(self, limit: int = 20_000):
        super().__init__()
        self.limit, self.text = limit, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.text = (self.text + s)[-self.limit:]
        return len(s)


def _on_every_rank(command: Callable[[Path | None], int]) -> int:
    """Run ``command(out_root)`` in every process of a torchrun job (once without torchrun).

    Joins the process group from torchrun's environment first. Rank 0 runs with the user's
    output directory (``out_root=None``); the other ranks run the same experiments (their
    training loops need every rank) with stdout and stderr captured and ``out_root`` a scratch
    directory, and print the tail of their log only when they fail.
    """
    from .distributed.data_parallel import init_from_env, is_main_process, rank, shutdown

    try:
        init_from_env()
    except ValueError as e:
        _err(f"attnkit: {e}")
        return 2
    try:
        if is_main_process():
            return command(None)
        log = _Tail()
        code: int | str | None = 1
        with tempfile.TemporaryDirectory(prefix=f"attnkit-rank{rank()}-") as tmp:
            try:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    code = command(Path(tmp))
            except SystemExit as e:  # argparse: --help, usage errors
                code = e.code
            finally:
                if code not in (0, None, 2):  # 2: a usage error, which rank 0 reports
                    _err(f"attnkit: rank {rank()} exited with {code}; its last output:\n"
                         + log.text)
        return code if isinstance(code, int) else (0 if code is None else 2)
    finally:
        shutdown()


_DEBUG = False  # --debug: tracebacks with the one-line errors


def main(argv: Sequence[str] | None = None) -> int:
    """The ``attnkit`` command; returns the exit status."""
    global _DEBUG
    argv = list(sys.argv[1:] if argv is None else argv)
    _DEBUG = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler below
        return code
    except KeyboardInterrupt:
        _err("attnkit: interrupted")
        return 128 + 2  # as a shell reports SIGINT
    except ReportInterrupted as e:
        _err(f"attnkit: {e}")
        return 128 + e.signum
    except BrokenPipeError:
        # the reader went away (``attnkit list | head -1``): stop quietly; stdout goes to
        # devnull so the interpreter's own flush at exit raises nothing either
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a process killed by SIGPIPE
    except _INPUT_ERRORS as e:
        if _DEBUG:
            _err(traceback.format_exc())
        _err(f"attnkit: error: {_one_line(e)}")
        return USAGE


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "run":  # options depend on the experiment: parsed in cmd_run
        return _on_every_rank(lambda root: cmd_run(argv[1:], _load(), out_root=root))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        return cmd_list(_load(), as_json=args.json)
    if args.command == "report":
        def report(root: Path | None) -> int:
            return cmd_report(args if root is None else
                              argparse.Namespace(**{**vars(args), "out": root}))
        return _on_every_rank(report)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
