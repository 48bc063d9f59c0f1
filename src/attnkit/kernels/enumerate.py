"""Enumerate the allowed pairs of a plan (for ``.csr``, ``.nnz`` and sparse weights).

Works chunk by chunk over queries, so memory is O(nnz) plus one chunk of candidates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .components import Component, Ranges, RowSet
from .structured import BLOCK, lower

_CHUNK_CANDIDATES = 1 << 24


def _chunk_pairs(comp: Component, q0: int, q1: int, lq: int, lk: int, device):
    if isinstance(comp, Ranges):
        cand = comp.block_candidates(q0, q1, lq, lk, BLOCK, device)
        if cand is None:
            return None
        qi, kj, valid = cand
    elif isinstance(comp, RowSet):
        rows = comp.rows_in(q0, q1, device)
        if rows.numel() == 0:
            return None
        qi, kj, valid = comp.candidates_for(rows, 0, lk, lq, lk)
    else:
        qi, kj, valid = comp.candidates(q0, q1, lq, lk, device)
    qi, kj = torch.broadcast_tensors(qi, kj)
    return qi[valid], kj[valid]


def _chunks(comps: list[Component], lq: int, lk: int):
    per_row = max(1, sum(c.cost(lq, lk) for c in comps) // max(lq, 1) + BLOCK)
    rows = max(BLOCK, _CHUNK_CANDIDATES // per_row)
    for q0 in range(0, lq, rows):
        yield q0, min(lq, q0 + rows)


def allowed_pairs(comps: list[Component], lq: int, lk: int, device=None) -> tuple[Tensor, Tensor]:
    """``(rows, cols)`` of every allowed pair, sorted by row then column."""
    comps = lower(comps, lq, lk)
    keys = []
    for q0, q1 in _chunks(comps, lq, lk):
        for c in comps:
            pr = _chunk_pairs(c, q0, q1, lq, lk, device)
            if pr is not None:
                keys.append(pr[0] * max(lk, 1) + pr[1])
    if not keys:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    key = torch.cat(keys).sort().values  # components are disjoint: no duplicates
    return key // max(lk, 1), key % max(lk, 1)


def count_pairs(comps: list[Component], lq: int, lk: int) -> int:
    comps = lower(comps, lq, lk)
    total = 0
    for q0, q1 in _chunks(comps, lq, lk):
        for c in comps:
            pr = _chunk_pairs(c, q0, q1, lq, lk, None)
            if pr is not None:
                total += int(pr[0].numel())
    return total
