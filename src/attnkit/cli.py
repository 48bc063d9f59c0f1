"""The ``attnkit`` command (also ``python -m attnkit``).

    attnkit list                                   every experiment and its claim
    attnkit run NAME [--quick] [--json] [--out DIR] [the experiment's own options]
    attnkit run NAME --help                        the experiment's own options
    attnkit report [--quick] [--out DIR] [--only NAME ...] [--strict]

``run --json`` prints the result as one JSON object, the last line on stdout; progress bars and
logs go to stderr. Exit codes: 0 on success (whatever the verdict: "not held" is a result, not
a failure), 1 when the experiment raised, 2 for usage errors (unknown experiment, bad option).
``report`` exits 0 once the report is written, even if experiments raised (each failure is in
the report and summarized on stderr); with ``--strict`` it exits 1 when any experiment raised.

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
import shutil
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .experiment.report import (
    HELD,
    NOT_RUN,
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


def _err(*msg: Any) -> None:
    print(*msg, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnkit",
        description="attnkit: exact structure-aware attention and the experiments built on it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("list", help="list every experiment and its claim")
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
    rep.add_argument("--out", type=Path, default=Path("report"),
                     help="output directory (default: report/)")
    rep.add_argument("--only", nargs="+", metavar="NAME", help="run only these experiments")
    rep.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    rep.add_argument("--strict", action="store_true",
                     help="exit 1 when any experiment raised (default: exit 0 once written)")
    return parser


def experiment_parser(exp: Experiment) -> argparse.ArgumentParser:
    """The parser of ``attnkit run NAME``: the common flags plus the experiment's options."""
    parser = argparse.ArgumentParser(
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
    common.add_argument("--out", type=Path, default=None,
                        help=f"directory for figures (default: report/{exp.name})")
    common.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
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
    metavar = getattr(opt.type, "__name__", "VALUE").upper()
    group.add_argument(opt.flag, dest=opt.dest, type=opt.type, default=opt.default,
                       required=opt.required, help=help_text.strip(), metavar=metavar)


# -------------------------------------------------------------------------------- commands


def _load() -> dict[str, Experiment]:
    experiments, broken = collect_experiments()
    for module, tb in broken:
        _err(f"attnkit: warning: {module} failed to import; its experiments are unavailable\n"
             f"{tb}")
    return experiments


def cmd_list(experiments: Mapping[str, Experiment]) -> int:
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


def _unknown(name: str, experiments: Mapping[str, Experiment]) -> int:
    _err(f"attnkit: unknown experiment {name!r}. Known experiments: "
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
    t0 = time.perf_counter()
    try:
        result, seconds = run_experiment(exp, quick=args.quick, out_dir=out_dir,
                                         options=options, seed=args.seed)
        obj = result_dict(exp, result, seconds)
    except Exception:
        tb = traceback.format_exc()
        _err(tb)
        _err(f"attnkit: experiment {name!r} raised; verdict not held")
        if args.json:
            print(json.dumps(error_dict(exp, tb, time.perf_counter() - t0), allow_nan=False),
                  flush=True)
        return 1
    if args.json:
        print(json.dumps(obj, allow_nan=False), flush=True)
    else:
        print(summary_text(obj))
    return 0


def summary_text(obj: Mapping[str, Any]) -> str:
    """A readable multi-line summary of one result dict."""
    cols = shutil.get_terminal_size((100, 20)).columns
    verdict = str(obj["verdict"]).upper()
    lines = [f"{obj['name']}: {verdict}  ({fmt(obj.get('seconds'))} s)"]
    lines += textwrap.wrap("claim: " + str(obj["claim"]), cols, subsequent_indent="  ")
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":  # options depend on the experiment: parsed in cmd_run
        return _on_every_rank(lambda root: cmd_run(argv[1:], _load(), out_root=root))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        return cmd_list(_load())
    if args.command == "report":
        def report(root: Path | None) -> int:
            return cmd_report(args if root is None else
                              argparse.Namespace(**{**vars(args), "out": root}))
        return _on_every_rank(report)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
