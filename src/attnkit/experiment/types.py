"""What an experiment is and what it returns (no dependencies beyond the stdlib).

Each application defines ``EXPERIMENT = Experiment(...)`` in its ``experiment.py``; the registry
(:mod:`attnkit.experiment.registry`) collects them, and the CLI and the report run them.

A verdict is computed from intervals, never from a bare number: an experiment declares the
quantities that decide its claim as :class:`Decision` objects (an estimate, its confidence
interval, a threshold and the side of the threshold the claim is on), and :func:`verdict_of`
turns them into ``"held"`` / ``"not held"`` / ``"inconclusive"``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HELD, NOT_HELD, INCONCLUSIVE, NOT_RUN = "held", "not held", "inconclusive", "not run"
#: The two sides a claim can be on: the deciding quantity is above (">") or below ("<") the
#: threshold.
DIRECTIONS = (">", "<")


@dataclass(frozen=True)
class Decision:
    """One quantity that decides a claim: ``value`` with its confidence interval
    ``[ci_low, ci_high]``, and the ``threshold`` the claim puts it above (``direction=">"``) or
    below (``direction="<"``).

    :attr:`outcome` is ``"held"`` when the whole interval lies on the claim's side of the
    threshold, ``"not held"`` when it lies wholly on the other side (touching the threshold
    counts as the other side), and ``"inconclusive"`` when it straddles the threshold or any of
    the numbers is NaN. :attr:`margin` says what would change that: the signed distance from the
    threshold to the interval's nearer bound, positive on the claim's side (e.g. ``0.02``: the
    lower bound would have to fall by 0.02 to leave the claim's side), negative on the other,
    0 when the interval straddles it.
    """

    name: str
    value: float
    ci_low: float
    ci_high: float
    threshold: float
    direction: str = ">"
    note: str = ""

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"Decision {self.name!r}: direction must be '>' or '<', "
                             f"got {self.direction!r}")
        for attr in ("value", "ci_low", "ci_high", "threshold"):
            x = getattr(self, attr)
            try:
                object.__setattr__(self, attr, float(x))
            except (TypeError, ValueError):
                raise TypeError(f"Decision {self.name!r}: {attr} must be a number, "
                                f"got {type(x).__name__}") from None
        if math.isnan(self.threshold):
            raise ValueError(f"Decision {self.name!r}: threshold must not be NaN")
        if self.ci_low > self.ci_high:
            raise ValueError(f"Decision {self.name!r}: ci_low {self.ci_low} > ci_high "
                             f"{self.ci_high}")

    @property
    def nan_fields(self) -> list[str]:
        return [a for a in ("value", "ci_low", "ci_high") if math.isnan(getattr(self, a))]

    def _signed(self, x: float) -> float:
        """How far ``x`` lies on the claim's side of the threshold (negative: other side)."""
        return x - self.threshold if self.direction == ">" else self.threshold - x

    @property
    def outcome(self) -> str:
        if self.nan_fields:
            return INCONCLUSIVE
        near, far = sorted((self._signed(self.ci_low), self._signed(self.ci_high)))
        if near > 0:
            return HELD
        if far <= 0:
            return NOT_HELD
        return INCONCLUSIVE

    @property
    def margin(self) -> float:
        if self.nan_fields:
            return math.nan
        near, far = sorted((self._signed(self.ci_low), self._signed(self.ci_high)))
        if near > 0:
            return near
        if far <= 0:
            return far
        return 0.0

    def explanation(self) -> str:
        """One line: the decision in words (used in notes and the report)."""
        if self.nan_fields:
            return f"{self.name}: {', '.join(self.nan_fields)} is NaN, so inconclusive"
        return (f"{self.name} = {self.value:.4g} [{self.ci_low:.4g}, {self.ci_high:.4g}] "
                f"vs {self.direction} {self.threshold:.4g}: {self.outcome}")

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "name": self.name, "value": num(self.value), "ci_low": num(self.ci_low),
            "ci_high": num(self.ci_high), "threshold": num(self.threshold),
            "direction": self.direction, "margin": num(self.margin), "outcome": self.outcome,
            "note": self.note,
        }


def verdict_of(decisions: Sequence[Decision]) -> str:
    """``"held"`` when every decision holds, ``"not held"`` when any is wholly on the other
    side, ``"inconclusive"`` otherwise (including no decisions at all)."""
    outcomes = [d.outcome for d in decisions]
    if not outcomes:
        return INCONCLUSIVE
    if NOT_HELD in outcomes:
        return NOT_HELD
    if all(o == HELD for o in outcomes):
        return HELD
    return INCONCLUSIVE


@dataclass(frozen=True)
class Option:
    """An experiment's own command-line option, e.g. ``Option("--fasta", help="FASTA file")``.

    The value reaches the experiment as ``ctx.options["fasta"]`` (dashes become underscores).
    """

    flag: str
    type: Callable[[str], Any] = str
    default: Any = None
    help: str = ""
    #: A required option has no embedded default; ``attnkit report`` lists the experiment as
    #: not run when it is missing, and ``attnkit run`` asks for it.
    required: bool = False
    #: The value's name in ``--help`` (e.g. ``PATH``, ``DIR``, ``N``). Default: the ``type``'s
    #: own ``metavar`` attribute if it has one, else derived (``DIR`` for a ``--...-dir`` flag,
    #: ``PATH`` for a ``Path`` type or a help text naming a file or path, ``N`` for ``int``).
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass
class Result:
    """What an experiment measured.

    ``decisions`` are the quantities that decide the claim, with their intervals; the verdict
    is computed from them (:attr:`verdict`). ``metrics`` is flat ``name -> number`` and keeps
    every number; each decision's value and interval are added to it as ``<name>``,
    ``<name>_ci_low`` and ``<name>_ci_high`` when the experiment did not put them there itself,
    and ``seeds`` (how many seeds were run) when given. ``table`` is a list of rows (dicts)
    shown in the report; ``figures`` are PNG paths (written under ``ctx.out_dir``).

    ``held`` is the older, interval-free form of a verdict (a bool the experiment computed);
    it is used only when there are no ``decisions``.
    """

    metrics: dict[str, float]
    held: bool | None = None
    table: list[dict[str, Any]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    decisions: list[Decision] = field(default_factory=list)
    seeds: int | None = None

    def __post_init__(self) -> None:
        if self.held is None and not self.decisions:
            raise ValueError("Result needs decisions (or the older held=bool)")
        if self.seeds is not None and (isinstance(self.seeds, bool) or int(self.seeds) < 1):
            raise ValueError(f"Result.seeds must be a positive count, got {self.seeds!r}")

    @property
    def verdict(self) -> str:
        if self.decisions:
            return verdict_of(self.decisions)
        return HELD if self.held else NOT_HELD

    def all_metrics(self) -> dict[str, Any]:
        """``metrics`` plus each decision's value and interval, and ``seeds``."""
        out: dict[str, Any] = dict(self.metrics)
        for d in self.decisions:
            out.setdefault(d.name, d.value)
            out.setdefault(f"{d.name}_ci_low", d.ci_low)
            out.setdefault(f"{d.name}_ci_high", d.ci_high)
        if self.seeds is not None:
            out.setdefault("seeds", int(self.seeds))
        return out

    def decision_notes(self) -> str:
        """One line per decision, and which values were NaN (for the notes)."""
        return "\n".join(d.explanation() for d in self.decisions)


@dataclass
class RunContext:
    quick: bool
    out_dir: Path
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def seed_list(self, quick: int = 3, full: int = 5) -> list[int]:
        """The seeds an experiment repeats over: ``quick`` of them in quick mode, ``full``
        otherwise, counting up from ``self.seed``."""
        n = quick if self.quick else full
        if n < 1:
            raise ValueError(f"seed count must be >= 1, got {n}")
        return [self.seed + i for i in range(n)]

    def progress(self, iterable: Iterable, desc: str = "", total: int | None = None) -> Iterator:
        """A progress bar on stderr (tqdm when installed, a plain counter otherwise)."""
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional
            return _plain_progress(iterable, desc, total)
        return iter(tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False))

    def log(self, *msg: Any) -> None:
        print(*msg, file=sys.stderr, flush=True)

    def pyplot(self) -> Any:
        """matplotlib's ``pyplot`` on the Agg backend, or ``None`` (logged once) when
        matplotlib is not installed: ``plt = ctx.pyplot(); if plt is None: return []``."""
        try:
            import matplotlib
        except ImportError:
            if not _PYPLOT_MISSING_LOGGED:
                _PYPLOT_MISSING_LOGGED.append(True)
                self.log("figures skipped: matplotlib not installed (pip install attnkit[plot])")
            return None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt

    def figure_path(self, name: str) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / name

    def save_figure(self, fig: Any, name: str, dpi: int = 110) -> str:
        """Lay out a matplotlib figure, save it as ``out_dir/name`` (atomically: a temporary
        file renamed into place), close it; return the path."""
        import matplotlib.pyplot as plt  # only reached when the caller already drew a figure

        from .io import atomic_path

        fig.tight_layout()
        path = self.figure_path(name)
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=dpi)
        finally:
            plt.close(fig)
        return str(path)


_PYPLOT_MISSING_LOGGED: list[bool] = []


def _plain_progress(iterable: Iterable, desc: str, total: int | None) -> Iterator:
    for i, x in enumerate(iterable, 1):
        print(f"\r{desc} {i}/{total or '?'}", end="", file=sys.stderr, flush=True)
        yield x
    print(file=sys.stderr)


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: measures one claim and returns a :class:`Result`."""

    name: str
    claim: str
    run: Callable[[RunContext], Result]
    options: tuple[Option, ...] = ()
    description: str = ""
