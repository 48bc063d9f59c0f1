"""Trophic-flow networks: the :class:`FoodWeb` container and readers for the Pajek files of the
SCOR collection and for the original SCOR text format (Ulanowicz).

Conventions: ``flows[i, j]`` is the flow *from* compartment ``i`` *to* compartment ``j`` (prey to
predator, source to sink), so a column lists a consumer's diet. Compartment types follow the
Scor2net partition: 1 living, 2 detritus (non-living), 3 import (the "Input" vertex), 4 export
("Output"), 5 respiration. Loaders parse text only; nothing in a file is ever executed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COMPARTMENT_TYPES: tuple[str, ...] = ("living", "detritus", "import", "export", "respiration")
#: Pajek partition code -> compartment type (the Scor2net convention of the SCOR collection).
PAJEK_PARTITION_CODES: dict[int, str] = {i + 1: t for i, t in enumerate(COMPARTMENT_TYPES)}
BOUNDARY_TYPES: tuple[str, ...] = ("import", "export", "respiration")


@dataclass(frozen=True, eq=False)
class FoodWeb:
    """A weighted trophic network of ``n`` compartments.

    Attributes:
        names: ``n`` compartment names.
        types: ``n`` entries of :data:`COMPARTMENT_TYPES`.
        flows: ``(n, n)`` float64, ``flows[i, j] >= 0`` is the flow from ``i`` (prey / source)
            to ``j`` (predator / sink); 0 means no link.
        biomass: ``(n,)`` float64 standing stocks (NaN where unknown).
        title: free text (the file name or network name).
    """

    names: tuple[str, ...]
    types: tuple[str, ...]
    flows: np.ndarray
    biomass: np.ndarray
    title: str = ""

    def __post_init__(self) -> None:
        names = tuple(str(x) for x in self.names)
        types = tuple(str(x) for x in self.types)
        n = len(names)
        if len(types) != n:
            raise ValueError(f"types must have one entry per compartment ({n}), got {len(types)}")
        bad = sorted(set(types) - set(COMPARTMENT_TYPES))
        if bad:
            raise ValueError(f"unknown compartment types {bad}; expected {COMPARTMENT_TYPES}")
        flows = np.array(self.flows, dtype=np.float64)
        if flows.shape != (n, n):
            raise ValueError(f"flows must have shape (n, n) = {(n, n)}, got {flows.shape}")
        if not np.isfinite(flows).all():
            raise ValueError("flows must be finite")
        if (flows < 0).any():
            i, j = np.argwhere(flows < 0)[0]
            raise ValueError(
                f"negative flow {flows[i, j]} from {names[i]!r} to {names[j]!r}; flows are >= 0"
            )
        biomass = np.array(self.biomass, dtype=np.float64).reshape(-1)
        if biomass.shape != (n,):
            raise ValueError(f"biomass must have shape (n,) = {(n,)}, got {biomass.shape}")
        if (biomass < 0).any():  # NaN (unknown) compares False and is allowed
            raise ValueError("biomass must be >= 0 (or NaN where unknown)")
        flows.setflags(write=False)
        biomass.setflags(write=False)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "types", types)
        object.__setattr__(self, "flows", flows)
        object.__setattr__(self, "biomass", biomass)

    @property
    def num_compartments(self) -> int:
        return len(self.names)

    @property
    def adjacency(self) -> np.ndarray:
        """``(n, n)`` bool: ``adjacency[i, j]`` iff ``j`` feeds on ``i`` (a positive flow)."""
        return self.flows > 0

    @property
    def num_links(self) -> int:
        return int(self.adjacency.sum())

    @property
    def connectance(self) -> float:
        """Directed connectance ``L / n**2`` (self-loops included, as Williams-Martinez count)."""
        n = self.num_compartments
        return self.num_links / (n * n) if n else 0.0

    def subweb(self, indices: np.ndarray | list[int]) -> FoodWeb:
        """The web restricted to the compartments ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_compartments):
            raise ValueError(f"indices must lie in [0, {self.num_compartments}), got {idx}")
        return FoodWeb(
            names=tuple(self.names[i] for i in idx),
            types=tuple(self.types[i] for i in idx),
            flows=self.flows[np.ix_(idx, idx)],
            biomass=self.biomass[idx],
            title=self.title,
        )

    def living(self) -> FoodWeb:
        """The living-compartment sub-web (the default for link prediction).

        Raises:
            ValueError: when the web has no living compartment (e.g. a pure water budget).
        """
        idx = [i for i, t in enumerate(self.types) if t == "living"]
        if not idx:
            raise ValueError(
                f"food web {self.title!r} has an empty living sub-web (no compartment of type "
                f"'living' among {self.num_compartments}); nothing to predict links for"
            )
        return self.subweb(idx)


# --------------------------------------------------------------------------------- Pajek

_VERTEX_LINE = re.compile(r'^\s*(\S+)\s+(?:"([^"]*)"|(\S+))')
# A SCOR data line: integers and numbers only (Fortran "D" exponents included).
_DATA_LINE = re.compile(r"^[-+]?\d+(\s+[-+]?(\d+\.?\d*|\.\d+)([eEdD][-+]?\d+)?)*\s*$")


def _number(token: str, lineno: int, what: str) -> float:
    try:
        x = float(token.replace("D", "E").replace("d", "e"))  # Fortran "1.0D+03" exponents
    except ValueError:
        raise ValueError(f"line {lineno}: {what} must be a number, got {token!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"line {lineno}: {what} must be finite, got {token!r}")
    return x


def _integer(token: str, lineno: int, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise ValueError(f"line {lineno}: {what} must be an integer, got {token!r}") from None


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # old SCOR files are 8-bit; every byte decodes


def read_pajek(path: str | Path) -> FoodWeb:
    """Read a Pajek ``.paj`` trophic-flow network (as in the SCOR collection).

    Understood sections: ``*partition`` + ``*vertices N`` + N integer type codes (1 living,
    2 detritus, 3 import, 4 export, 5 respiration; all living when absent), ``*network`` +
    ``*vertices N`` + N lines ``index "name"``, ``*arcs`` with lines ``prey predator [flow]``
    (flow 1 when omitted), and ``*vector`` + ``*vertices N`` + N biomasses (NaN when absent).
    Lines starting with ``%`` are comments.

    Raises:
        ValueError: on any malformed content (with the line number): unknown sections, counts
            that disagree, arcs to unknown vertices, negative or non-finite flows, duplicate arcs.
    """
    return _read_with(parse_pajek, path)


def _read_with(parse, path: str | Path) -> FoodWeb:
    """Decode a file and parse it, prefixing any ``ValueError`` with the file's path."""
    path = Path(path)
    try:
        return parse(_decode(path.read_bytes()), title=path.stem)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def parse_pajek(text: str, title: str = "") -> FoodWeb:
    """Parse the text of a Pajek trophic-flow network; see :func:`read_pajek`."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    lines = text.splitlines()
    total = len(lines)
    partition: list[str] | None = None
    names: list[str] | None = None
    biomass: list[float] | None = None
    arcs: list[tuple[int, int, float, int]] = []
    context = "network"  # which block a "*vertices N" line belongs to
    vertices_line: tuple[int, int] | None = None  # (line, N) of the block just read
    pos = 0

    def data_lines(count: int, start: int) -> tuple[list[tuple[int, str]], int]:
        """The next ``count`` non-comment, non-blank lines after ``start``."""
        out: list[tuple[int, str]] = []
        p = start
        while len(out) < count:
            if p >= total:
                raise ValueError(f"line {start}: expected {count} lines after *vertices, "
                                 f"found {len(out)}")
            s = lines[p].strip()
            p += 1
            if not s or s.startswith("%"):
                continue
            if s.startswith("*"):
                raise ValueError(f"line {p}: expected {count} lines after *vertices, "
                                 f"found {len(out)} before {s.split()[0]!r}")
            out.append((p, s))
        return out, p

    while pos < total:
        s = lines[pos].strip()
        pos += 1
        if not s or s.startswith("%"):
            continue
        if not s.startswith("*"):
            if context == "arcs":
                tok = s.split()
                if len(tok) not in (2, 3):
                    raise ValueError(f"line {pos}: an arc is 'prey predator [flow]', got {s!r}")
                src = _integer(tok[0], pos, "arc source")
                dst = _integer(tok[1], pos, "arc target")
                flow = _number(tok[2], pos, "arc flow") if len(tok) == 3 else 1.0
                arcs.append((src, dst, flow, pos))
                continue
            if vertices_line is not None:
                ln0, declared = vertices_line
                raise ValueError(f"line {pos}: more vertex lines than the {declared} that "
                                 f"'*vertices {declared}' on line {ln0} declares ({s[:40]!r})")
            raise ValueError(f"line {pos}: unexpected data line {s[:40]!r} outside a section")
        keyword = s.split()[0].lower()
        vertices_line = None
        if keyword == "*partition":
            context = "partition"
        elif keyword == "*network":
            context = "network"
        elif keyword == "*vector":
            context = "vector"
        elif keyword == "*arcs":
            context = "arcs"
        elif keyword == "*vertices":
            tok = s.split()
            if len(tok) < 2:
                raise ValueError(f"line {pos}: '*vertices N' needs a count")
            count = _integer(tok[1], pos, "vertex count")
            if not 0 < count <= total:  # also guards memory against absurd counts
                raise ValueError(f"line {pos}: vertex count must be in [1, {total}], got {count}")
            vertices_line = (pos, count)
            block, pos = data_lines(count, pos)
            if context == "partition":
                if partition is not None:
                    raise ValueError(f"line {pos}: a second *partition")
                partition = []
                for ln, row in block:
                    code = _integer(row.split()[0], ln, "partition code")
                    if code not in PAJEK_PARTITION_CODES:
                        raise ValueError(f"line {ln}: partition code must be one of "
                                         f"{sorted(PAJEK_PARTITION_CODES)}, got {code}")
                    partition.append(PAJEK_PARTITION_CODES[code])
            elif context == "vector":
                if biomass is not None:
                    raise ValueError(f"line {pos}: a second *vector")
                biomass = [_number(row.split()[0], ln, "biomass") for ln, row in block]
                bad = [x for x in biomass if x < 0]
                if bad:
                    raise ValueError(f"*vector: biomass must be >= 0, got {bad[0]}")
            elif context == "network":
                if names is not None:
                    raise ValueError(f"line {pos}: a second vertex list")
                found: dict[int, str] = {}
                for ln, row in block:
                    m = _VERTEX_LINE.match(row)
                    if m is None:
                        raise ValueError(f"line {ln}: a vertex line is 'index \"name\"', "
                                         f"got {row[:40]!r}")
                    idx = _integer(m.group(1), ln, "vertex index")
                    if not 1 <= idx <= count or idx in found:
                        raise ValueError(f"line {ln}: vertex index must be a new index in "
                                         f"[1, {count}], got {idx}")
                    found[idx] = m.group(2) if m.group(2) is not None else m.group(3)
                names = [found[i] for i in range(1, count + 1)]
            else:
                raise ValueError(f"line {pos}: *vertices inside the {context} section")
        elif keyword in ("*edges", "*edgeslist", "*arcslist", "*matrix"):
            raise ValueError(f"line {pos}: section {keyword} is not supported for trophic flows "
                             "(use *arcs 'prey predator flow')")
        else:
            raise ValueError(f"line {pos}: unknown section {keyword[:30]!r}")

    if names is None:
        raise ValueError("no vertex list (*network / *vertices N) found")
    n = len(names)
    if partition is None:
        partition = ["living"] * n
    if len(partition) != n:
        raise ValueError(f"*partition has {len(partition)} vertices, the network has {n}")
    if biomass is None:
        biomass = [math.nan] * n
    if len(biomass) != n:
        raise ValueError(f"*vector has {len(biomass)} vertices, the network has {n}")
    flows = np.zeros((n, n), dtype=np.float64)
    seen = np.zeros((n, n), dtype=bool)
    for src, dst, flow, ln in arcs:
        for end in (src, dst):
            if not 1 <= end <= n:
                raise ValueError(f"line {ln}: arc to unknown vertex {end} (vertices are 1..{n})")
        if flow < 0:
            raise ValueError(f"line {ln}: negative flow {flow} from vertex {src} to {dst}")
        if seen[src - 1, dst - 1]:
            raise ValueError(f"line {ln}: duplicate arc {src} -> {dst}")
        seen[src - 1, dst - 1] = True
        flows[src - 1, dst - 1] = flow
    return FoodWeb(names=tuple(names), types=tuple(partition), flows=flows,
                   biomass=np.asarray(biomass), title=title)


# --------------------------------------------------------------------------------- SCOR


def read_scor(path: str | Path) -> FoodWeb:
    """Read a network in the original SCOR text format (Ulanowicz's NETWRK input).

    The format, line by line (blank lines ignored)::

        title
        n n_living                  (compartments; the first n_living are living)
        name_1 ... name_n           (one per line)
        i biomass_i     ... -1      (four "i value" vectors, each ended by a line starting
        i import_i      ... -1       with -1: biomasses, imports, exports, respirations;
        i export_i      ... -1       a missing i means 0)
        i respiration_i ... -1
        i j flow_ij     ... -1      (intercompartmental flows from i to j)

    The result has the ``n`` compartments (living, then detritus) followed by three boundary
    compartments "Input", "Output", "Respiration" (types import / export / respiration)
    carrying the imports, exports and respirations, as the Pajek versions of these files do.

    Raises:
        ValueError: on malformed content (with the line number), negative values, indices out of
            range, repeated entries, or a missing ``-1`` terminator.
    """
    return _read_with(parse_scor, path)


def parse_scor(text: str, title: str = "") -> FoodWeb:
    """Parse the text of a SCOR network; see :func:`read_scor`."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    rows = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if len(rows) < 2:
        raise ValueError("a SCOR file needs a title line and a 'n n_living' line")
    header = rows[0][1]
    ln, counts = rows[1]
    counts_ln = ln
    tok = counts.split()
    if len(tok) < 2:
        raise ValueError(f"line {ln}: expected 'n_compartments n_living', got {counts!r}")
    n = _integer(tok[0], ln, "number of compartments")
    n_living = _integer(tok[1], ln, "number of living compartments")
    if not 1 <= n <= len(rows):
        raise ValueError(f"line {ln}: number of compartments must be in [1, {len(rows)}], got {n}")
    if not 0 <= n_living <= n:
        raise ValueError(f"line {ln}: number of living compartments must be in [0, {n}], "
                         f"got {n_living}")
    if len(rows) < 2 + n:
        raise ValueError(f"expected {n} compartment names, found {len(rows) - 2}")
    names = [row for _, row in rows[2:2 + n]]
    for name_ln, row in rows[2:2 + n]:
        if _DATA_LINE.match(row) and (len(row.split()) > 1 or row == "-1"):  # count too large
            raise ValueError(
                f"line {name_ln}: compartment name {row!r} looks like a data line; line {ln} "
                f"declares {n} compartments but only {name_ln - rows[2][0]} names precede it "
                "(the count must equal the number of name lines)"
            )
    pos = 2 + n

    def block(width: int, what: str) -> tuple[list[tuple[int, list[str]]], int]:
        nonlocal pos
        out: list[tuple[int, list[str]]] = []
        while True:
            if pos >= len(rows):
                raise ValueError(f"{what}: missing the -1 terminator line")
            ln, row = rows[pos]
            pos += 1
            tok = row.split()
            if tok[0] == "-1":
                return out, ln
            first = what == "biomass" and not out  # the line right after the names
            if len(tok) != width or (first and not _DATA_LINE.match(row)):
                hint = ""
                if first:
                    hint = (f" (a name? line {counts_ln} declares {n} compartments: the count "
                            "must equal the number of name lines)")
                raise ValueError(f"line {ln}: {what} lines have {width} fields (numbers), got "
                                 f"{row!r}{hint}")
            out.append((ln, tok))

    def index(token: str, ln: int, what: str) -> int:
        i = _integer(token, ln, what)
        if not 1 <= i <= n:
            raise ValueError(f"line {ln}: {what} {i} is not a compartment (1..{n})")
        return i - 1

    vectors: dict[str, np.ndarray] = {}
    for what in ("biomass", "import", "export", "respiration"):
        vec = np.zeros(n)
        seen: set[int] = set()
        entries, _ = block(2, what)
        for ln, (i_tok, x_tok) in entries:
            i = index(i_tok, ln, f"{what} compartment")
            x = _number(x_tok, ln, what)
            if x < 0:
                raise ValueError(f"line {ln}: negative {what} {x} for compartment {i + 1}")
            if i in seen:
                raise ValueError(f"line {ln}: repeated {what} entry for compartment {i + 1}")
            seen.add(i)
            vec[i] = x
        vectors[what] = vec
    m = n + 3
    flows = np.zeros((m, m))
    seen_pairs: set[tuple[int, int]] = set()
    entries, _ = block(3, "flow")
    for ln, (i_tok, j_tok, x_tok) in entries:
        i = index(i_tok, ln, "flow source")
        j = index(j_tok, ln, "flow target")
        x = _number(x_tok, ln, "flow")
        if x < 0:
            raise ValueError(f"line {ln}: negative flow {x} from compartment {i + 1} to {j + 1}")
        if (i, j) in seen_pairs:
            raise ValueError(f"line {ln}: repeated flow {i + 1} -> {j + 1}")
        seen_pairs.add((i, j))
        flows[i, j] = x
    flows[n, :n] = vectors["import"]
    flows[:n, n + 1] = vectors["export"]
    flows[:n, n + 2] = vectors["respiration"]
    types = ["living"] * n_living + ["detritus"] * (n - n_living)
    types += list(BOUNDARY_TYPES)
    biomass = np.concatenate([vectors["biomass"], np.zeros(3)])
    return FoodWeb(names=tuple(names) + ("Input", "Output", "Respiration"), types=tuple(types),
                   flows=flows, biomass=biomass, title=title or header)


def write_scor(web: FoodWeb, path: str | Path, title: str | None = None) -> None:
    """Write ``web`` in the SCOR text format read by :func:`read_scor`.

    Living compartments are written first, then detritus; flows from import compartments become
    imports, flows into export / respiration compartments become exports / respirations.

    Raises:
        ValueError: when a flow cannot be expressed in SCOR (into an import compartment, out of
            an export / respiration compartment, or between two boundary compartments).
    """
    if not isinstance(web, FoodWeb):
        raise TypeError(f"web must be a FoodWeb, got {type(web).__name__}")
    types = np.array(web.types)
    inner = np.concatenate([np.flatnonzero(types == "living"), np.flatnonzero(types == "detritus")])
    imp = np.flatnonzero(types == "import")
    exp = np.flatnonzero(types == "export")
    resp = np.flatnonzero(types == "respiration")
    boundary = np.concatenate([imp, exp, resp])
    f = web.flows
    if f[:, imp].any() or f[exp, :].any() or f[resp, :].any():
        raise ValueError("flows into an import compartment or out of an export / respiration "
                         "compartment cannot be written in SCOR")
    if f[np.ix_(boundary, boundary)].any():
        raise ValueError("flows between boundary compartments cannot be written in SCOR")
    if inner.size == 0:
        raise ValueError("web has no living or detritus compartment to write")
    n_living = int((types == "living").sum())
    out = [title if title is not None else (web.title or "food web"),
           f"{inner.size} {n_living}"]
    out += [web.names[i] for i in inner]

    def vector(values: np.ndarray) -> None:
        out.extend(f"{k + 1} {float(x)!r}" for k, x in enumerate(values) if x != 0)
        out.append("-1")

    vector(np.nan_to_num(web.biomass[inner], nan=0.0))
    vector(f[np.ix_(imp, inner)].sum(axis=0))
    vector(f[np.ix_(inner, exp)].sum(axis=1))
    vector(f[np.ix_(inner, resp)].sum(axis=1))
    sub = f[np.ix_(inner, inner)]
    for a, b in zip(*np.nonzero(sub), strict=True):
        out.append(f"{a + 1} {b + 1} {float(sub[a, b])!r}")
    out.append("-1 -1")
    Path(path).write_text("\n".join(out) + "\n", encoding="utf-8")


def read_foodweb(path: str | Path) -> FoodWeb:
    """Read a ``.paj`` file with :func:`read_pajek`, anything else as SCOR (:func:`read_scor`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"food web file {path} does not exist or is not a file")
    return read_pajek(path) if path.suffix.lower() == ".paj" else read_scor(path)
