"""What an experiment is and what it returns (no I/O, no dependencies beyond the stdlib).

Each application defines ``EXPERIMENT = Experiment(...)`` in its ``experiment.py``; the registry
(``attnkit.experiments``) collects them, and the CLI and the report run them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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

    ``held`` is computed by the experiment from its numbers; ``metrics`` is flat
    ``name -> number``; ``table`` is a list of rows (dicts) shown in the report; ``figures``
    are PNG paths (written under ``ctx.out_dir``).
    """

    metrics: dict[str, float]
    held: bool
    table: list[dict[str, Any]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


@dataclass
class RunContext:
    quick: bool
    out_dir: Path
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def progress(self, iterable: Iterable, desc: str = "", total: int | None = None) -> Iterator:
        """A progress bar on stderr (tqdm when installed, a plain counter otherwise)."""
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional
            return _plain_progress(iterable, desc, total)
        return iter(tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False))

    def log(self, *msg: Any) -> None:
        print(*msg, file=sys.stderr, flush=True)

    def figure_path(self, name: str) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / name

    def save_figure(self, fig: Any, name: str, dpi: int = 110) -> str:
        """Lay out a matplotlib figure, save it as ``out_dir/name``, close it; return the path."""
        import matplotlib.pyplot as plt  # only reached when the caller already drew a figure

        fig.tight_layout()
        path = self.figure_path(name)
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        return str(path)


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
