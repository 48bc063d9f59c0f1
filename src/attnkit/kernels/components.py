"""Plan components: the disjoint pieces a pattern is compiled into.

A pattern (``attnkit.patterns``) compiles, for given sizes ``(Lq, Lk)``, into a list of
components. Each component names a *candidate* set of key positions per query that a
structured kernel can enumerate cheaply, plus mask predicates that cut the candidates down to
exactly the allowed pairs (and remove pairs an earlier component of a union already covers, so
that every allowed pair is counted once).

Index convention: queries and keys are indexed ``0..Lq-1`` and ``0..Lk-1``. Positional patterns
place query ``i`` at position ``i + delta`` with ``delta = Lk - Lq`` (queries are the *last* Lq
positions, which is what KV-cached decoding needs); when ``Lq == Lk``, ``delta == 0``.

Each component's :meth:`candidates` returns ``(qi, kj, valid)`` for the query range
``[q0, q1)``: integer tensors broadcastable to the candidate score layout and a bool mask of that
layout. Candidate key indices are clamped into range; ``valid`` is False where they were not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

# (qi, kj, valid): query indices, key indices, allowed-mask, broadcastable to one layout.
Candidates = tuple[Tensor, Tensor, Tensor]

__all__ = [
    "Component",
    "Band",
    "Offsets",
    "KeySet",
    "RowSet",
    "AllKeys",
    "Edges",
    "Ranges",
    "MaskTerm",
]


@dataclass(frozen=True)
class MaskTerm:
    """A predicate ``pattern.allowed(i, j, Lq, Lk)``, possibly negated."""

    pattern: object
    negate: bool = False

    def __call__(self, i: Tensor, j: Tensor, lq: int, lk: int) -> Tensor:
        a = self.pattern.allowed(i, j, lq, lk)
        return ~a if self.negate else a


@dataclass(frozen=True)
class Component:
    masks: tuple[MaskTerm, ...] = field(default=(), kw_only=True)

    def with_mask(self, term: MaskTerm) -> Component:
        return replace(self, masks=self.masks + (term,))

    def _apply_masks(self, qi: Tensor, kj: Tensor, valid: Tensor, lq: int, lk: int) -> Tensor:
        for term in self.masks:
            valid = valid & term(qi, kj, lq, lk)
        return valid

    # Estimated number of candidate pairs (used to pick the cheaper side of an intersection).
    def cost(self, lq: int, lk: int) -> int:  # pragma: no cover - overridden
        raise NotImplementedError


@dataclass(frozen=True)
class Band(Component):
    """Keys ``j = i + delta + o`` for every offset ``o`` in ``[lo, hi]`` (a contiguous band)."""

    lo: int
    hi: int

    def cost(self, lq: int, lk: int) -> int:
        return lq * (self.hi - self.lo + 1)


@dataclass(frozen=True)
class Offsets(Component):
    """Keys ``j = i + delta + o`` for each ``o`` in a short, sorted list of offsets."""

    offsets: tuple[int, ...]

    def cost(self, lq: int, lk: int) -> int:
        return lq * len(self.offsets)

    def candidates(self, q0: int, q1: int, lq: int, lk: int, device) -> Candidates:
        delta = lk - lq
        qi = torch.arange(q0, q1, device=device).unsqueeze(-1)  # (nq, 1)
        off = torch.tensor(self.offsets, device=device, dtype=torch.long)
        kj = qi + delta + off  # (nq, n_off)
        valid = (kj >= 0) & (kj < lk)
        kj = kj.clamp(0, max(lk - 1, 0))
        return qi, kj, self._apply_masks(qi, kj, valid, lq, lk)


@dataclass(frozen=True)
class KeySet(Component):
    """A fixed set of keys (e.g. global hub tokens) seen by every query."""

    keys: Tensor  # (nk,) long, sorted, unique, in range

    def cost(self, lq: int, lk: int) -> int:
        return lq * int(self.keys.numel())

    def candidates(self, q0: int, q1: int, lq: int, lk: int, device) -> Candidates:
        qi = torch.arange(q0, q1, device=device).unsqueeze(-1)
        kj = self.keys.to(device).unsqueeze(0)
        valid = torch.ones(qi.shape[0], kj.shape[1], dtype=torch.bool, device=device)
        return qi, kj, self._apply_masks(qi, kj, valid, lq, lk)


@dataclass(frozen=True)
class RowSet(Component):
    """A fixed set of queries (e.g. global hub tokens) that see every key."""

    rows: Tensor  # (nr,) long, sorted, unique, in range

    def cost(self, lq: int, lk: int) -> int:
        return int(self.rows.numel()) * lk

    def rows_in(self, q0: int, q1: int, device) -> Tensor:
        r = self.rows.to(device)
        return r[(r >= q0) & (r < q1)]

    def candidates_for(self, rows: Tensor, k0: int, k1: int, lq: int, lk: int):
        qi = rows.unsqueeze(-1)
        kj = torch.arange(k0, k1, device=rows.device).unsqueeze(0)
        valid = torch.ones(qi.shape[0], kj.shape[1], dtype=torch.bool, device=rows.device)
        return qi, kj, self._apply_masks(qi, kj, valid, lq, lk)


@dataclass(frozen=True)
class AllKeys(Component):
    """Every key for every query (dense), cut by the mask predicates (e.g. causal)."""

    def cost(self, lq: int, lk: int) -> int:
        return lq * lk

    def candidates(self, q0: int, q1: int, lq: int, lk: int, device) -> Candidates:
        qi = torch.arange(q0, q1, device=device).unsqueeze(-1)
        kj = torch.arange(lk, device=device).unsqueeze(0)
        valid = torch.ones(qi.shape[0], lk, dtype=torch.bool, device=device)
        return qi, kj, self._apply_masks(qi, kj, valid, lq, lk)


@dataclass(frozen=True)
class Ranges(Component):
    """Each query ``i`` sees the contiguous keys ``[start[i], stop[i])``.

    Covers bands (fixed-width ranges sliding with ``i``) and packed segments (block diagonal).
    Kernels work in query blocks of ``block`` rows: a block's candidate keys are the union of
    its rows' ranges, gathered once and shared by the block's rows.
    """

    start: Tensor  # (Lq,) long
    stop: Tensor  # (Lq,) long
    #: ``(lo, hi)`` when the ranges are a band of offsets: windows then sit at a fixed stride,
    #: which lets the kernel view keys as overlapping windows instead of gathering them.
    band: tuple[int, int] | None = None

    def cost(self, lq: int, lk: int) -> int:
        return int((self.stop - self.start).clamp_min(0).sum())

    def block_candidates(self, q0: int, q1: int, lq: int, lk: int, block: int, device):
        """Candidates in query blocks: ``qi (nb, bq, 1)``, ``kj (nb, 1, C)`` (clamped) and
        ``valid (nb, bq, C)``; rows past ``q1`` (padding of the last block) are all invalid.
        Returns ``None`` when no query in the range has a key."""
        nq = q1 - q0
        nb = -(-nq // block)
        pad = nb * block - nq
        start = self.start.to(device)[q0:q1].clamp(0, lk)
        stop = torch.maximum(self.stop.to(device)[q0:q1].clamp(0, lk), start)
        if pad:
            start = torch.cat([start, start[-1:].expand(pad)])
            stop = torch.cat([stop, start[-1:].expand(pad)])  # padded rows: empty ranges
        start, stop = start.view(nb, block), stop.view(nb, block)
        bstart = start.amin(1)
        width = int((stop.amax(1) - bstart).max()) if nb else 0
        if width == 0:
            return None
        kj = bstart.unsqueeze(1) + torch.arange(width, device=device)  # (nb, C)
        kj = kj.clamp(max=lk - 1).unsqueeze(1)  # (nb, 1, C)
        qi = torch.arange(q0, q0 + nb * block, device=device).clamp(max=lq - 1)
        qi = qi.view(nb, block, 1)
        raw = bstart.view(nb, 1, 1) + torch.arange(width, device=device)
        valid = (raw >= start.unsqueeze(2)) & (raw < stop.unsqueeze(2))
        return qi, kj, self._apply_masks(qi, kj, valid, lq, lk)


@dataclass(frozen=True)
class Edges(Component):
    """An explicit list of allowed pairs in CSR form (graphs, random keys)."""

    indptr: Tensor  # (Lq + 1,) long
    indices: Tensor  # (nnz,) long

    def cost(self, lq: int, lk: int) -> int:
        return int(self.indices.numel())

    def candidates(self, q0: int, q1: int, lq: int, lk: int, device) -> Candidates:
        indptr = self.indptr.to(device)
        e0, e1 = int(indptr[q0]), int(indptr[q1])
        counts = indptr[q0 + 1 : q1 + 1] - indptr[q0:q1]
        qi = torch.repeat_interleave(torch.arange(q0, q1, device=device), counts)
        kj = self.indices.to(device)[e0:e1]
        valid = torch.ones_like(qi, dtype=torch.bool)
        return qi, kj, self._apply_masks(qi, kj, valid, lq, lk)


def band_ranges(lo: int, hi: int, lq: int, lk: int, device=None) -> tuple[Tensor, Tensor]:
    """``[start, stop)`` per query for a band of offsets ``[lo, hi]``."""
    pos = torch.arange(lq, device=device) + (lk - lq)
    return pos + lo, pos + hi + 1


def segment_ranges(lengths: Sequence[int], device=None) -> tuple[Tensor, Tensor]:
    lens = torch.as_tensor(list(lengths), dtype=torch.long, device=device)
    ends = torch.cumsum(lens, 0)
    starts = ends - lens
    return torch.repeat_interleave(starts, lens), torch.repeat_interleave(ends, lens)
