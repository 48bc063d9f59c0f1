"""Attention patterns: which keys each query may see.

A pattern is a predicate ``allowed(i, j)`` over query index ``i`` and key index ``j`` together
with a *plan*: a list of disjoint components that structured kernels enumerate without ever
building an ``Lq x Lk`` matrix. Patterns compose with ``|`` (union) and ``&`` (intersection)::

    from attnkit import patterns as P
    p = P.sliding_window(256) | P.global_tokens([0, 1000]) | P.exponential()
    causal_local = P.sliding_window(64) & P.causal()

Positional patterns (``causal``, ``sliding_window``, ``dilated``, ``exponential``,
``global_tokens``) place query ``i`` at position ``i + (Lk - Lq)``: queries are the last ``Lq``
positions of the key sequence, which is what KV-cached decoding needs. Index-based patterns
(``graph``, ``random_keys``, ``block_diagonal``) use the raw indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .kernels.components import (
    AllKeys,
    Band,
    Component,
    Edges,
    KeySet,
    MaskTerm,
    Offsets,
    Ranges,
    RowSet,
    segment_ranges,
)

__all__ = [
    "Pattern",
    "causal",
    "sliding_window",
    "dilated",
    "exponential",
    "global_tokens",
    "random_keys",
    "graph",
    "edge_index_of",
    "block_diagonal",
    "from_mask_mod",
]

# Plans and CSR structures are host-side metadata (moved to the inputs' device by the kernels),
# built on the CPU whatever torch's default device: a seeded pattern draws the same keys
# everywhere.
_HOST = torch.device("cpu")
# Above this many offsets a dilated pattern is cheaper as a masked band than as a gather.
_MAX_GATHER_OFFSETS = 96


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _band_within(lo: int, hi: int, lq: int, lk: int) -> tuple[int, int] | None:
    """The offsets ``[lo, hi]`` cut to those some (query, key) pair can have, or None.

    Offsets ``j - i - (Lk - Lq)`` of real pairs lie in ``[1 - Lk, Lq - 1]``; clamping keeps the
    cost of a window, dilation or offset list bounded by the sequence length whatever its size
    (``sliding_window(10**9)`` on 8 tokens plans 15 offsets, not 2e9)."""
    lo, hi = max(lo, 1 - lk), min(hi, lq - 1)
    return (lo, hi) if lo <= hi else None


def _check_sizes(lq: int, lk: int) -> None:
    for name, n in (("Lq", lq), ("Lk", lk)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")


def allowed_offsets(local: Pattern | None, length: int) -> Tensor:
    """The sorted offsets ``j - i`` that the translation-invariant pattern ``local`` (the first
    part of :meth:`Pattern.split_global`) allows on ``length`` positions; empty for None."""
    if local is None or length <= 0:
        return torch.zeros(0, dtype=torch.long)
    cand = local.offsets_within(length)
    if cand is None:
        cand = torch.arange(-(length - 1), length)
    if cand.numel() == 0:
        return cand
    ok = local.allowed(torch.zeros((), dtype=torch.long), cand, length, length)
    return cand[torch.broadcast_to(ok, cand.shape)]


class Pattern:
    """Base class. Subclasses define :meth:`allowed` and :meth:`_plan`."""

    #: True when the pattern is dense-shaped (attention weights come back as a dense tensor).
    is_dense: bool = False
    #: ``(lo, hi)`` when the pattern is exactly "offset ``j - pos(i)`` in ``[lo, hi]``".
    offset_range: tuple[float, float] | None = None

    # --- the predicate --------------------------------------------------------------
    def allowed(self, i: Tensor, j: Tensor, lq: int, lk: int) -> Tensor:
        """Bool tensor: may query ``i`` see key ``j``? (``i``, ``j`` broadcast.)"""
        raise NotImplementedError

    def validate(self, lq: int, lk: int) -> None:
        """Raise ``ValueError`` when the pattern cannot apply to these sizes."""

    # --- the plan -------------------------------------------------------------------
    def _plan(self, lq: int, lk: int) -> list[Component]:
        raise NotImplementedError

    def plan(self, lq: int, lk: int) -> list[Component]:
        """Disjoint components whose allowed pairs are exactly this pattern's."""
        _check_sizes(lq, lk)
        self.validate(lq, lk)
        return self._plan(lq, lk)

    def cost(self, lq: int, lk: int) -> int:
        """Candidate pairs the kernels will score (an upper bound on ``nnz``)."""
        return sum(c.cost(lq, lk) for c in self.plan(lq, lk))

    # --- structure, for modules that shard or plan around a pattern -------------------
    def offsets_within(self, length: int) -> Tensor | None:
        """For self-attention on ``length`` positions: a sorted ``(n,)`` long tensor holding
        every offset ``j - i`` this pattern may allow (a superset; :meth:`allowed` decides),
        or None when the pattern is not made of offsets (index-based patterns)."""
        return None

    def global_indices(self) -> tuple[int, ...]:
        """Sorted positions of the global tokens in this pattern (rows that see every key and
        keys every row sees, before any intersection cuts them); ``()`` when none."""
        return ()

    def split_global(self) -> tuple[Pattern | None, tuple[int, ...]] | None:
        """``(local, hubs)``: the translation-invariant part that rows other than the global
        ones see (``None`` when empty) and :meth:`global_indices`; None when the pattern has a
        part that is neither (graph, random keys, block diagonal, mask_mod)."""
        return None

    def halo(self, length: int) -> tuple[int, int]:
        """``(left, right)``: how many positions before and after its own a non-global query
        may reach in a sequence of ``length`` positions (the halo a shard of the sequence
        needs from its neighbours). ``ValueError`` unless :meth:`split_global` is defined."""
        split = self.split_global()
        if split is None:
            raise ValueError(f"{self!r} is not made of offsets and global tokens: no halo")
        offs = allowed_offsets(split[0], length)
        if offs.numel() == 0:
            return 0, 0
        return max(0, -int(offs[0])), max(0, int(offs[-1]))

    # --- composition ------------------------------------------------------------------
    def __or__(self, other: Pattern) -> Pattern:
        if not isinstance(other, Pattern):
            return NotImplemented
        return Union(self, other)

    def __and__(self, other: Pattern) -> Pattern:
        if not isinstance(other, Pattern):
            return NotImplemented
        return Intersection(self, other)

    # --- inspection -------------------------------------------------------------------
    def pairs(self, lq: int, lk: int, device=None) -> tuple[Tensor, Tensor]:
        """All allowed ``(query, key)`` pairs, sorted by query then key."""
        from .kernels.enumerate import allowed_pairs

        return allowed_pairs(self.plan(lq, lk), lq, lk, device)

    def csr(self, lq: int, lk: int, device=None) -> tuple[Tensor, Tensor]:
        """``(indptr (Lq+1,), indices (nnz,))``: the allowed keys of each query, sorted."""
        rows, cols = self.pairs(lq, lk, device)
        counts = torch.bincount(rows, minlength=lq)
        indptr = torch.zeros(lq + 1, dtype=torch.long, device=cols.device)
        indptr[1:] = torch.cumsum(counts, 0)
        return indptr, cols

    def nnz(self, lq: int, lk: int) -> int:
        """Number of allowed pairs (from :meth:`nnz_from_offsets` where it applies, else
        counted chunk by chunk)."""
        from .kernels.enumerate import count_pairs

        _check_sizes(lq, lk)
        self.validate(lq, lk)  # (as plan() would: no plan is built where a formula counts)
        counted = self.nnz_from_offsets(lq, lk)
        return counted if counted is not None else count_pairs(self._plan(lq, lk), lq, lk)

    def nnz_from_offsets(self, lq: int, lk: int) -> int | None:
        """Number of allowed pairs without listing them, for self-attention (``Lq == Lk``) on
        a pattern whose every row sees the same offsets (:meth:`split_global` without global
        tokens): offset ``o`` is allowed in ``Lq - |o|`` rows. None otherwise."""
        split = self.split_global() if lq == lk else None
        if split is None or split[1]:
            return None
        return int((lq - allowed_offsets(split[0], lq).abs()).sum())

    def to_dense(self, lq: int, lk: int, device=None) -> Tensor:
        """The ``(Lq, Lk)`` bool mask, straight from the predicate (for tests on small sizes)."""
        _check_sizes(lq, lk)
        self.validate(lq, lk)
        i = torch.arange(lq, device=device).unsqueeze(1)
        j = torch.arange(lk, device=device).unsqueeze(0)
        return torch.broadcast_to(self.allowed(i, j, lq, lk), (lq, lk)).clone()

    # --- FlexAttention interop ----------------------------------------------------------
    def to_block_mask(self, lq: int, lk: int, *, device=None, block_size: int = 128):
        """This pattern as a FlexAttention ``BlockMask`` for ``(Lq, Lk)`` (batch and heads
        broadcast), built by ``create_block_mask`` with a ``mask_mod`` that reads the pattern.
        Needs torch with ``torch.nn.attention.flex_attention`` (2.5 or newer)."""
        return _to_block_mask(self, lq, lk, device, block_size)


# ------------------------------------------------------------------------------- positional


class Causal(Pattern):
    is_dense = True
    offset_range = (float("-inf"), 0)

    def allowed(self, i, j, lq, lk):
        return j <= i + (lk - lq)

    def _plan(self, lq, lk):
        return [AllKeys(masks=(MaskTerm(self),))]

    def offsets_within(self, length):
        return torch.arange(-max(length - 1, 0), 1)

    def split_global(self):
        return self, ()

    def __repr__(self) -> str:
        return "causal()"


class SlidingWindow(Pattern):
    def __init__(self, w: int):
        self.w = _check_int("window w", w, 0)
        self.offset_range = (-self.w, self.w)

    def allowed(self, i, j, lq, lk):
        # |offset| < max(lq, lk): a larger w changes nothing, and may not fit int64
        return (j - i - (lk - lq)).abs() <= min(self.w, max(lq, lk))

    def _plan(self, lq, lk):
        band = _band_within(-self.w, self.w, lq, lk)
        return [] if band is None else [Band(*band)]

    def offsets_within(self, length):
        n = max(length - 1, 0)
        return torch.arange(-min(self.w, n), min(self.w, n) + 1)

    def split_global(self):
        return self, ()

    def __repr__(self) -> str:
        return f"sliding_window({self.w})"


class Dilated(Pattern):
    def __init__(self, w: int, d: int):
        self.w = _check_int("dilated w", w, 0)
        self.d = _check_int("dilated d", d, 1)

    def allowed(self, i, j, lq, lk):
        o = j - i - (lk - lq)
        # |o| < max(lq, lk) = n: a reach beyond n, or a step beyond n (only offset 0 then
        # divides), changes nothing; clamping keeps both inside int64
        n = max(lq, lk)
        return (o.abs() <= min(self.w * self.d, n)) & (torch.remainder(o, min(self.d, n + 1)) == 0)

    def _plan(self, lq, lk):
        band = _band_within(-self.w * self.d, self.w * self.d, lq, lk)
        if band is None:
            return []
        lo, hi = band
        if self.d == 1:
            return [Band(lo, hi)]
        first = -(-lo // self.d) * self.d  # the smallest multiple of d >= lo
        if (hi - first) // self.d + 1 <= _MAX_GATHER_OFFSETS:
            return [Offsets(tuple(range(first, hi + 1, self.d)))]
        return [Band(lo, hi, masks=(MaskTerm(self),))]

    def offsets_within(self, length):
        n = max(length - 1, 0)
        r = min(self.w * self.d, n) // self.d * self.d
        return torch.arange(-r, r + 1, self.d)

    def split_global(self):
        return self, ()

    def __repr__(self) -> str:
        return f"dilated({self.w}, {self.d})"


class Exponential(Pattern):
    def __init__(self, base: int = 2):
        self.base = _check_int("exponential base", base, 2)

    def offsets(self, lq: int, lk: int) -> tuple[int, ...]:
        n = max(lq, lk)
        pos, step = [], 1
        while step <= n:
            pos.append(step)
            step *= self.base
        return tuple([-s for s in reversed(pos)] + [0] + pos)

    def allowed(self, i, j, lq, lk):
        o = j - i - (lk - lq)
        offs = torch.tensor(self.offsets(lq, lk), device=o.device, dtype=o.dtype)
        return torch.isin(o, offs)

    def _plan(self, lq, lk):
        return [Offsets(self.offsets(lq, lk))]

    def offsets_within(self, length):
        n = length - 1
        return torch.tensor([o for o in self.offsets(length, length) if -n <= o <= n],
                            dtype=torch.long)

    def split_global(self):
        return self, ()

    def __repr__(self) -> str:
        return f"exponential(base={self.base})"


def _require_integer(name: str, t: Tensor) -> None:
    """``TypeError`` naming ``name`` unless ``t`` holds integers (not float, complex or bool)."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")


def _index_tensor(name: str, values, *, allow_empty: bool = True) -> Tensor:
    if not isinstance(values, Tensor):
        values = list(values)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
            raise TypeError(f"{name} must be integers")
        if any(not -(2**63) <= x < 2**63 for x in values):
            raise ValueError(f"{name} must fit in int64")
        values = torch.tensor(values, dtype=torch.long)
    t = values
    _require_integer(name, t)
    t = t.long().reshape(-1) if t.dim() <= 1 else None
    if t is None:
        raise ValueError(f"{name} must be a 1-D sequence of ints")
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} must be non-negative, got min {int(t.min())}")
    return torch.unique(t)  # sorted, unique


class GlobalTokens(Pattern):
    def __init__(self, indices: Sequence[int] | Tensor):
        self.indices = _index_tensor("global_tokens indices", indices)

    def validate(self, lq, lk):
        if self.indices.numel() and int(self.indices.max()) >= lk:
            raise ValueError(
                f"global_tokens indices must be < sequence length {lk}, "
                f"got {int(self.indices.max())}"
            )

    def allowed(self, i, j, lq, lk):
        g = self.indices.to(i.device)
        return torch.isin(i + (lk - lq), g) | torch.isin(j, g)

    def _plan(self, lq, lk):
        delta = lk - lq
        rows = self.indices - delta
        rows = rows[(rows >= 0) & (rows < lq)]
        if self.indices.numel() == 0:
            return []
        row_term = _RowsOf(rows)
        return [RowSet(rows), KeySet(self.indices, masks=(MaskTerm(row_term, negate=True),))]

    def global_indices(self):
        return tuple(self.indices.tolist())

    def split_global(self):
        return None, self.global_indices()

    def __repr__(self) -> str:
        return f"global_tokens({self.indices.tolist()})"


class _RowsOf(Pattern):
    """Internal predicate: query index in a set."""

    def __init__(self, rows: Tensor):
        self.rows = rows

    def allowed(self, i, j, lq, lk):
        return torch.isin(i, self.rows.to(i.device))


# ------------------------------------------------------------------------------ index-based


class _CSRPattern(Pattern):
    """A pattern given by an explicit CSR per ``(Lq, Lk)``; membership by binary search."""

    def _csr_for(self, lq: int, lk: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _keys(self, lq, lk) -> Tensor:
        key = (lq, lk)
        cache = self.__dict__.setdefault("_key_cache", {})
        if key not in cache:
            indptr, indices = self._csr_for(lq, lk)
            rows = torch.repeat_interleave(torch.arange(lq, device=indptr.device),
                                           indptr[1:] - indptr[:-1])
            cache[key] = rows * max(lk, 1) + indices  # sorted: CSR rows then sorted cols
        return cache[key]

    def allowed(self, i, j, lq, lk):
        keys = self._keys(lq, lk).to(i.device)
        q = (i * max(lk, 1) + j).expand(torch.broadcast_shapes(i.shape, j.shape))
        if keys.numel() == 0:
            return torch.zeros(q.shape, dtype=torch.bool, device=q.device)
        pos = torch.searchsorted(keys, q.contiguous()).clamp(max=keys.numel() - 1)
        return (keys[pos] == q) & (i >= 0) & (j >= 0) & (j < lk) & (i < lq)

    def _plan(self, lq, lk):
        indptr, indices = self._csr_for(lq, lk)
        return [Edges(indptr, indices)]


class Graph(_CSRPattern):
    """Query ``i`` sees key ``j`` iff there is an edge ``j -> i`` (PyG: ``edge_index[0]`` are
    sources, ``edge_index[1]`` targets). Duplicate edges count once."""

    def __init__(self, edge_index: Tensor, num_nodes: int | tuple[int, int]):
        if not isinstance(edge_index, Tensor):
            edge_index = torch.as_tensor(edge_index)
        _require_integer("edge_index", edge_index)
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}")
        if isinstance(num_nodes, int) and not isinstance(num_nodes, bool):
            n_src = n_dst = num_nodes
        elif isinstance(num_nodes, tuple) and len(num_nodes) == 2:
            n_src, n_dst = num_nodes
        else:
            raise TypeError("num_nodes must be an int or a (num_src, num_dst) tuple")
        _check_int("num_nodes", n_src, 0)
        _check_int("num_nodes", n_dst, 0)
        if n_src * n_dst >= 2**63:  # pair keys dst * n_src + src must fit in int64
            raise ValueError(f"num_nodes ({n_src}, {n_dst}) is too large: n_src * n_dst must be "
                             "< 2**63")
        ei = edge_index.long().cpu()
        if ei.numel():
            if int(ei.min()) < 0:
                raise ValueError(f"edge_index has a negative index ({int(ei.min())})")
            if int(ei[0].max()) >= n_src or int(ei[1].max()) >= n_dst:
                raise ValueError(
                    f"edge_index out of range for num_nodes={num_nodes!r}: sources must be "
                    f"< {n_src} and targets < {n_dst} (got max source {int(ei[0].max())}, "
                    f"max target {int(ei[1].max())})"
                )
        self.num_src, self.num_dst = n_src, n_dst
        key = torch.unique(ei[1] * max(n_src, 1) + ei[0])  # sorted by target, then source
        self._dst = key // max(n_src, 1)
        self._src = key % max(n_src, 1)

    @classmethod
    def from_sorted_pairs(cls, src: Tensor, dst: Tensor, num_nodes: int) -> Graph:
        """A graph pattern from distinct, in-range pairs already sorted by ``(dst, src)``
        (as :func:`torch.unique` of ``dst * N + src`` gives them): skips the checks and the
        sort of the constructor. The caller guarantees the order; nothing is verified."""
        self = cls.__new__(cls)
        self.num_src = self.num_dst = int(num_nodes)
        self._src, self._dst = src.long().cpu(), dst.long().cpu()
        return self

    def validate(self, lq, lk):
        if lq != self.num_dst or lk != self.num_src:
            raise ValueError(
                f"graph pattern has {self.num_dst} targets x {self.num_src} sources, "
                f"but attention has Lq={lq} queries and Lk={lk} keys"
            )

    def _csr_for(self, lq, lk):
        counts = torch.bincount(self._dst, minlength=lq)
        indptr = torch.zeros(lq + 1, dtype=torch.long, device=_HOST)
        indptr[1:] = torch.cumsum(counts, 0)
        return indptr, self._src

    def __repr__(self) -> str:
        return f"graph(E={self._src.numel()}, num_nodes=({self.num_src}, {self.num_dst}))"


# Rows of Floyd's sampler handled at once with a dense "taken" table: at most this many cells.
_TAKEN_CELLS = 1 << 24


def _floyd(rows: int, n: int, m: int, gen: torch.Generator) -> Tensor:
    """``(rows, m)`` picks, each row ``m`` distinct keys of ``range(n)`` drawn uniformly.

    Floyd's algorithm: step ``j`` (``n - m <= j < n``) draws ``t`` in ``[0, j]`` and keeps
    ``t``, or ``j`` when ``t`` is already kept: exactly ``m`` draws, no rejection. Membership is
    a comparison with the kept picks (``m**2 / 2`` per row) or, when cheaper, a per-row table
    of ``n`` flags."""
    picks = torch.empty(rows, m, dtype=torch.long, device=_HOST)
    if m == 0:
        return picks
    dense = m > 32 and n <= 4 * m * m
    step = max(1, _TAKEN_CELLS // n) if dense else max(1, _TAKEN_CELLS // m)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        base = torch.arange(r1 - r0, device=_HOST) * n  # row starts in the flat table
        taken = torch.zeros((r1 - r0) * n, dtype=torch.bool, device=_HOST) if dense else None
        out = picks[r0:r1]
        for c, j in enumerate(range(n - m, n)):
            t = torch.randint(0, j + 1, (r1 - r0,), generator=gen, device=_HOST)
            seen = taken[base + t] if dense else (out[:, :c] == t.unsqueeze(1)).any(1)
            pick = torch.where(seen, j, t)
            out[:, c] = pick
            if dense:
                taken[base + pick] = True
    return picks


def _distinct_per_row(rows: int, n: int, m: int, gen: torch.Generator) -> Tensor:
    """``(rows, m)`` sorted, each row ``m`` distinct keys of ``range(n)`` chosen uniformly.

    When ``m > n / 2`` the ``n - m`` left-out keys are drawn instead, so the work is
    ``O(rows * min(m, n - m))`` draws (plus the output)."""
    if 2 * m <= n:
        return _floyd(rows, n, m, gen).sort(1).values
    out = torch.empty(rows, m, dtype=torch.long, device=_HOST)
    step = max(1, _TAKEN_CELLS // max(n, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        left_out = _floyd(r1 - r0, n, n - m, gen)
        keep = torch.ones(r1 - r0, n, dtype=torch.bool, device=_HOST)
        keep.scatter_(1, left_out, False)
        out[r0:r1] = keep.nonzero()[:, 1].view(r1 - r0, m)  # row-major: sorted per row
    return out


class RandomKeys(_CSRPattern):
    """``r`` distinct random keys per query (BigBird style), fixed by ``seed``."""

    def __init__(self, r: int, seed: int = 0):
        self.r = _check_int("random_keys r", r, 1)
        self.seed = _check_int("random_keys seed", seed, 0)
        if seed >= 2**64:  # torch generators take 64-bit seeds
            raise ValueError(f"random_keys seed must be < 2**64, got {seed}")
        self._cache: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    def _csr_for(self, lq, lk):
        if (lq, lk) not in self._cache:
            gen = torch.Generator().manual_seed(self.seed)
            r = min(self.r, lk)
            cols = _distinct_per_row(lq, lk, r, gen)
            indptr = torch.arange(lq + 1, device=_HOST) * r
            self._cache[(lq, lk)] = (indptr, cols.reshape(-1))
        return self._cache[(lq, lk)]

    def __repr__(self) -> str:
        return f"random_keys({self.r}, seed={self.seed})"


class BlockDiagonal(Pattern):
    """Packed variable-length sequences: a query sees the keys of its own segment."""

    def __init__(self, lengths: Sequence[int] | Tensor):
        lens = torch.as_tensor(lengths)
        _require_integer("block_diagonal lengths", lens)
        if lens.dim() != 1:
            raise ValueError("block_diagonal lengths must be a 1-D sequence of ints")
        if lens.numel() == 0 or int(lens.min()) < 1:
            raise ValueError("block_diagonal lengths must be positive ints")
        self.lengths = lens.long()
        self.total = int(self.lengths.sum())
        self._bounds = torch.cumsum(self.lengths, 0)

    def validate(self, lq, lk):
        if lq != self.total or lk != self.total:
            raise ValueError(
                f"block_diagonal lengths sum to {self.total}, but Lq={lq} and Lk={lk}"
            )

    def _segment(self, x: Tensor) -> Tensor:
        return torch.searchsorted(self._bounds.to(x.device), x, right=True)

    def allowed(self, i, j, lq, lk):
        return self._segment(i.contiguous()) == self._segment(j.contiguous())

    def _plan(self, lq, lk):
        start, stop = segment_ranges(self.lengths.tolist())
        return [Ranges(start, stop)]

    def __repr__(self) -> str:
        return f"block_diagonal({self.lengths.tolist()})"


# ------------------------------------------------------------------------------ composition


def _merged_globals(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """The global indices a union or an intersection reports: those of either part, sorted."""
    return tuple(sorted(set(a) | set(b)))


class Union(Pattern):
    def __init__(self, a: Pattern, b: Pattern):
        self.a, self.b = a, b
        self.is_dense = a.is_dense and b.is_dense

    def validate(self, lq, lk):
        self.a.validate(lq, lk)
        self.b.validate(lq, lk)

    def allowed(self, i, j, lq, lk):
        return self.a.allowed(i, j, lq, lk) | self.b.allowed(i, j, lq, lk)

    def _plan(self, lq, lk):
        # b's pairs that a already covers are removed, so every pair counts once: offsets
        # inside a's offset range are dropped outright, anything else is masked by "not a".
        not_a = MaskTerm(self.a, negate=True)
        out = self.a._plan(lq, lk)
        for c in self.b._plan(lq, lk):
            if self.a.offset_range is not None and isinstance(c, (Band, Offsets)):
                out.extend(_remove_offsets(c, *self.a.offset_range))
            else:
                out.append(c.with_mask(not_a))
        return out

    def offsets_within(self, length):
        a, b = self.a.offsets_within(length), self.b.offsets_within(length)
        return None if a is None or b is None else torch.unique(torch.cat([a, b]))

    def global_indices(self):
        return _merged_globals(self.a.global_indices(), self.b.global_indices())

    def split_global(self):
        sa, sb = self.a.split_global(), self.b.split_global()
        if sa is None or sb is None:
            return None
        (la, ha), (lb, hb) = sa, sb
        local = la if lb is None else lb if la is None else Union(la, lb)
        return local, _merged_globals(ha, hb)

    def __repr__(self) -> str:
        return f"({self.a!r} | {self.b!r})"


def _clip(comp: Component, lo: float, hi: float) -> Component | None:
    """Clip a band or offset list to the offsets ``[lo, hi]``; None when nothing is left."""
    if isinstance(comp, Band):
        nlo, nhi = max(comp.lo, lo), min(comp.hi, hi)
        return Band(int(nlo), int(nhi), masks=comp.masks) if nlo <= nhi else None
    if isinstance(comp, Offsets):
        offs = tuple(o for o in comp.offsets if lo <= o <= hi)
        return Offsets(offs, masks=comp.masks) if offs else None
    return comp


def _remove_offsets(comp: Band | Offsets, lo: float, hi: float) -> list[Component]:
    """``comp`` without the offsets in ``[lo, hi]``."""
    if isinstance(comp, Offsets):
        offs = tuple(o for o in comp.offsets if o < lo or o > hi)
        return [Offsets(offs, masks=comp.masks)] if offs else []
    parts = []
    if comp.lo < lo:
        parts.append(Band(comp.lo, int(min(comp.hi, lo - 1)), masks=comp.masks))
    if comp.hi > hi:
        parts.append(Band(int(max(comp.lo, hi + 1)), comp.hi, masks=comp.masks))
    return parts


class Intersection(Pattern):
    def __init__(self, a: Pattern, b: Pattern):
        self.a, self.b = a, b
        self.is_dense = a.is_dense and b.is_dense
        if a.offset_range and b.offset_range:
            self.offset_range = (
                max(a.offset_range[0], b.offset_range[0]),
                min(a.offset_range[1], b.offset_range[1]),
            )

    def validate(self, lq, lk):
        self.a.validate(lq, lk)
        self.b.validate(lq, lk)

    def allowed(self, i, j, lq, lk):
        return self.a.allowed(i, j, lq, lk) & self.b.allowed(i, j, lq, lk)

    def _plan(self, lq, lk):
        pa, pb = self.a._plan(lq, lk), self.b._plan(lq, lk)
        cost_a = sum(c.cost(lq, lk) for c in pa)
        cost_b = sum(c.cost(lq, lk) for c in pb)
        # Enumerate the cheaper side's candidates, cut by the other side's predicate.
        base, other = (pa, self.b) if cost_a <= cost_b else (pb, self.a)
        out = []
        for c in base:
            if other.offset_range is not None and isinstance(c, (Band, Offsets)):
                clipped = _clip(c, *other.offset_range)
                if clipped is not None:
                    out.append(clipped)  # the clip is exact: no predicate needed
            else:
                out.append(c.with_mask(MaskTerm(other)))
        return out

    def offsets_within(self, length):
        a, b = self.a.offsets_within(length), self.b.offsets_within(length)
        if a is None or b is None:
            return b if a is None else a
        return a[torch.isin(a, b)]

    def global_indices(self):
        return _merged_globals(self.a.global_indices(), self.b.global_indices())

    def split_global(self):
        sa, sb = self.a.split_global(), self.b.split_global()
        if sa is None or sb is None:
            return None
        (la, ha), (lb, hb) = sa, sb
        local = None if la is None or lb is None else Intersection(la, lb)
        return local, _merged_globals(ha, hb)

    def __repr__(self) -> str:
        return f"({self.a!r} & {self.b!r})"


# ------------------------------------------------------------------------------ constructors


def causal() -> Pattern:
    """Query at position ``p`` sees keys ``j <= p``."""
    return Causal()


def sliding_window(w: int) -> Pattern:
    """Keys within ``w`` positions: ``|j - p| <= w``."""
    return SlidingWindow(w)


def dilated(w: int, d: int) -> Pattern:
    """Every ``d``-th key within ``w*d`` positions: ``|j-p| <= w*d`` and ``(j-p) % d == 0``."""
    return Dilated(w, d)


def exponential(base: int = 2) -> Pattern:
    """Keys at offsets ``0, +-1, +-base, +-base**2, ...``: ``O(log L)`` keys per query."""
    return Exponential(base)


def global_tokens(indices: Sequence[int] | Tensor) -> Pattern:
    """These positions see every key and are seen by every query."""
    return GlobalTokens(indices)


def random_keys(r: int, seed: int = 0) -> Pattern:
    """``r`` fixed random keys per query (BigBird style)."""
    return RandomKeys(r, seed)


def graph(edge_index, num_nodes: int | tuple[int, int] | None = None) -> Pattern:
    """Query ``i`` sees key ``j`` iff the graph has an edge ``j -> i`` (PyG convention).

    ``edge_index`` may be (see :func:`edge_index_of`):

    * an integer tensor ``(2, E)`` (row 0 sources, row 1 targets) or nested lists of ints;
    * a PyTorch Geometric ``Data`` (its ``edge_index`` and ``num_nodes``);
    * a sparse adjacency, ``torch.sparse_coo`` / ``torch.sparse_csr`` tensor or SciPy sparse
      matrix, of shape ``(num_src, num_dst)`` whose nonzero ``A[j, i]`` is an edge ``j -> i``
      (as PyG's ``to_torch_coo_tensor(edge_index)`` / ``to_scipy_sparse_matrix`` build it).

    ``num_nodes`` is an int (square) or ``(num_src, num_dst)``. When it is not given it comes
    from the ``Data`` object or the adjacency's shape, else from ``edge_index`` as
    ``max index + 1``: nodes above the largest index (isolated ones) are then left out, so give
    ``num_nodes`` when they exist. Bad input raises before any kernel runs: ``TypeError`` for a
    non-integer ``edge_index``, ``ValueError`` naming ``edge_index`` / ``num_nodes`` for a wrong
    shape, a negative index, or ``num_nodes`` not above the largest index.
    """
    ei, n = edge_index_of(edge_index, num_nodes)
    return Graph(ei, n)


def _is_pyg_data(obj) -> bool:
    """A PyG ``Data`` (or anything like it) without importing torch_geometric."""
    return (not isinstance(obj, Tensor) and hasattr(obj, "edge_index")
            and (type(obj).__module__.startswith("torch_geometric")
                 or hasattr(obj, "num_nodes")))


def _is_scipy_sparse(obj) -> bool:
    return type(obj).__module__.startswith("scipy.sparse") and hasattr(obj, "tocoo")


def edge_index_of(obj, num_nodes: int | tuple[int, int] | None = None
                  ) -> tuple[Tensor, int | tuple[int, int]]:
    """``(edge_index (2, E) long, num_nodes)`` from any graph input :func:`graph` accepts.

    Neither torch_geometric nor scipy is imported: their objects are recognised by duck
    typing (``edge_index`` attribute, ``scipy.sparse`` module). A sparse adjacency's nonzero
    entries are its edges (stored zeros are not); its shape ``(rows, cols)`` is
    ``(num_src, num_dst)``, an int when square. ``num_nodes``, when given, must agree with a
    ``Data``'s / an adjacency's own count.
    """
    if _is_pyg_data(obj):
        own = getattr(obj, "num_nodes", None)
        if num_nodes is None:
            num_nodes = own
        elif own is not None and own != num_nodes:
            raise ValueError(f"num_nodes={num_nodes!r} disagrees with the Data object's "
                             f"num_nodes={own}")
        obj = obj.edge_index
        if obj is None:
            raise ValueError("edge_index: the Data object has no edge_index")
    elif isinstance(obj, Tensor) and obj.layout in (torch.sparse_coo, torch.sparse_csr):
        if obj.dim() != 2:
            raise ValueError(f"edge_index: a sparse adjacency must be 2-D (num_src, num_dst), "
                             f"got shape {tuple(obj.shape)}")
        coo = (obj.to_sparse_coo() if obj.layout == torch.sparse_csr else obj).coalesce()
        nz = coo.values() != 0
        if nz.dim() > 1:  # hybrid tensors: an edge where any stored value is nonzero
            nz = nz.flatten(1).any(1)
        obj, shape = coo.indices()[:, nz], tuple(coo.shape)
        num_nodes = _adjacency_nodes(shape, num_nodes)
    elif _is_scipy_sparse(obj):
        if len(obj.shape) != 2:
            raise ValueError(f"edge_index: a sparse adjacency must be 2-D, got {obj.shape}")
        import numpy as np  # a core dependency; scipy itself is never imported here

        coo = obj.tocoo()
        keep = np.asarray(coo.data) != 0
        rows = torch.as_tensor(np.asarray(coo.row)[keep].astype(np.int64))
        cols = torch.as_tensor(np.asarray(coo.col)[keep].astype(np.int64))
        obj = torch.stack([rows, cols])
        num_nodes = _adjacency_nodes((int(coo.shape[0]), int(coo.shape[1])), num_nodes)
    if not isinstance(obj, Tensor):
        try:
            obj = torch.as_tensor(obj)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"edge_index must be an integer tensor (2, E), a PyG Data, a sparse "
                            f"adjacency or nested lists of ints, got {type(obj).__name__}"
                            ) from e
    _require_integer("edge_index", obj)
    if obj.dim() != 2 or obj.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, E), got {tuple(obj.shape)}")
    if num_nodes is None:  # documented inference: the largest index + 1
        num_nodes = int(obj.max()) + 1 if obj.numel() else 0
        if obj.numel() and int(obj.min()) < 0:
            raise ValueError(f"edge_index has a negative index ({int(obj.min())})")
    return obj, num_nodes


def _adjacency_nodes(shape: tuple[int, int], num_nodes) -> int | tuple[int, int]:
    """An adjacency's node count: an int when square, else ``(num_src, num_dst)``; a given
    ``num_nodes`` must describe the same shape."""
    if num_nodes is not None:
        given = num_nodes if isinstance(num_nodes, tuple) else (num_nodes, num_nodes)
        if tuple(given) != shape:
            raise ValueError(f"num_nodes={num_nodes!r} disagrees with the adjacency's shape "
                             f"{shape}")
    return shape[0] if shape[0] == shape[1] else shape


def block_diagonal(lengths: Sequence[int] | Tensor) -> Pattern:
    """Packed variable-length sequences: each position sees its own segment."""
    return BlockDiagonal(lengths)


# ------------------------------------------------------------------------- FlexAttention


class MaskMod(Pattern):
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` as a pattern.

    The predicate is evaluated lazily, one block of candidate pairs at a time (the engine's
    dense plan cut by the predicate), so no ``Lq x Lk`` mask is built; it is exact but scores
    every pair, so compose it with a sparse pattern (``sliding_window(w) & from_mask_mod(f)``)
    to score only that pattern's candidates. Indices are raw (``0..Lq-1``, ``0..Lk-1``, as in
    FlexAttention, not shifted like the positional patterns). Patterns are batch- and
    head-independent: ``b`` and ``h`` are fixed to ``batch`` and ``head`` (0-d long tensors).
    """

    def __init__(self, mask_mod, batch: int = 0, head: int = 0):
        if not callable(mask_mod):
            raise TypeError(
                "mask_mod must be callable (b, h, q_idx, kv_idx) -> bool tensor, "
                f"got {type(mask_mod).__name__}"
            )
        self.mask_mod = mask_mod
        self.batch = _check_int("from_mask_mod batch", batch, 0)
        self.head = _check_int("from_mask_mod head", head, 0)

    def allowed(self, i, j, lq, lk):
        b = torch.tensor(self.batch, device=i.device)
        h = torch.tensor(self.head, device=i.device)
        out = self.mask_mod(b, h, i, j)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            got = out.dtype if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"mask_mod must return a bool tensor, got {got}")
        return out

    def _plan(self, lq, lk):
        return [AllKeys(masks=(MaskTerm(self),))]

    def __repr__(self) -> str:
        name = getattr(self.mask_mod, "__name__", type(self.mask_mod).__name__)
        return f"from_mask_mod({name}, batch={self.batch}, head={self.head})"


def from_mask_mod(mask_mod, *, batch: int = 0, head: int = 0) -> Pattern:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` as a pattern, read
    lazily per block of candidates (exact; see :class:`MaskMod`). A ``mask_mod`` that depends
    on the batch or head index gives one pattern per ``(batch, head)``."""
    return MaskMod(mask_mod, batch, head)


# Patterns whose predicate is plain index arithmetic: their ``allowed`` works under vmap and
# traces into FlexAttention kernels as is. Others (isin, searchsorted, seeded draws) are read
# through a sorted list of their allowed pairs.
_ARITHMETIC = (Causal, SlidingWindow, Dilated, MaskMod)


def _is_arithmetic(p: Pattern) -> bool:
    if isinstance(p, (Union, Intersection)):
        return _is_arithmetic(p.a) and _is_arithmetic(p.b)
    return isinstance(p, _ARITHMETIC)


def _to_block_mask(p: Pattern, lq: int, lk: int, device, block_size: int):
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as e:  # torch < 2.5
        raise RuntimeError(
            f"to_block_mask needs torch.nn.attention.flex_attention (torch >= 2.5), "
            f"this is torch {torch.__version__}"
        ) from e
    _check_sizes(lq, lk)
    p.validate(lq, lk)
    _check_int("block_size", block_size, 1)
    if _is_arithmetic(p):

        def mask_mod(b, h, q_idx, kv_idx):
            return p.allowed(q_idx, kv_idx, lq, lk)

    else:
        rows, cols = p.pairs(lq, lk, device)
        keys = rows * max(lk, 1) + cols  # sorted: pairs come sorted by row, then key

        def mask_mod(b, h, q_idx, kv_idx):
            if keys.numel() == 0:
                return torch.zeros_like(q_idx, dtype=torch.bool)
            flat = q_idx.long() * max(lk, 1) + kv_idx.long()
            pos = torch.searchsorted(keys, flat).clamp(max=keys.numel() - 1)
            return keys[pos] == flat

    return create_block_mask(mask_mod, None, None, lq, lk, device=device, BLOCK_SIZE=block_size)
