"""Enumerate the allowed pairs of a plan (for ``.csr``, ``.nnz`` and sparse weights).

Works chunk by chunk over queries, so memory is O(nnz) plus one chunk of candidates. Each
component lists its pairs of a chunk already sorted (query, then key); the components of a plan
are disjoint, so a chunk's CSR order is a merge of sorted lists, placed by binary search
(:func:`.structured.merge_positions`) instead of a sort of every pair.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native
from .components import Component, Edges, Offsets, Ranges, RowSet
from .structured import (
    BLOCK,
    Ctx,
    WeightsSink,
    chunk_rows,
    component_scores,
    index_dtype,
    lower,
    merge_positions,
    place,
    uses_sparse_mm,
)


def _weights_empty(shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
    """An uninitialized weights buffer (values or indices); on the CPU from
    :func:`.native.recycled_empty`, so a large one reuses the memory of earlier weights that
    nothing holds any more (its pages already there) instead of faulting in fresh memory."""
    if torch.device(device).type == "cpu":
        return native.recycled_empty(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)

_CHUNK_CANDIDATES = 1 << 24
# Elements of one chunk's score buffer in pair_weights: small enough that its few passes
# (GEMM, gather, exp) stay in cache instead of streaming from memory.
WEIGHTS_CHUNK_ELEMENTS = 1 << 20


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
        parts = []
        for c in comps:
            pr = _chunk_pairs(c, q0, q1, lq, lk, device)
            if pr is not None:
                parts.append(pr[0] * max(lk, 1) + pr[1])
        if parts:  # components are disjoint, each lists its pairs sorted
            keys.append(place(parts, merge_positions(parts), sum(p_.numel() for p_ in parts)))
    if not keys:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    key = torch.cat(keys) if len(keys) > 1 else keys[0]
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


def pair_weights(qs: Tensor, k: Tensor, comps: list[Component], ctx: Ctx, lse: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """The attention weights of every allowed pair in CSR order, ``exp(score - lse)``.

    Args:
        qs: queries ``(B, Hkv, G, Lq, D)``, pre-scaled or with their factor in
            ``ctx.q_scale`` (see :func:`.structured.scale_in_kernel`); k: keys
            ``(B, Hkv, Lk, D)``.
        comps: the plan's (lowered) components, as the forward ran them.
        ctx: the forward's context (bias, ``score_mod``).
        lse: the forward's log-sum-exp ``(B, Hkv, G, Lq)`` over all components.

    Returns:
        ``indptr (Lq + 1,)``, ``indices (nnz,)`` (the pattern's :meth:`csr`, int32 where
        it fits: :func:`.structured.index_dtype`) and
        ``values (B, Hkv, G, nnz)`` in the compute dtype (differentiable). Each component's
        scores come from its own kernel's score step (a blocked GEMM for bands and segments, a
        shifted dot product per offset, sampled products for edges), chunk by chunk: no per-pair
        gather of the key rows and no Python loop over rows. Rows with ``lse = -inf`` (no
        allowed key, or only ``-inf`` logits) get weight 0.
    """
    B, hkv, g, lq, d = qs.shape
    lk = ctx.lk
    device = qs.device
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (qs, k, lse, ctx.bias))
    sink = ctx.weights_sink
    if sink is not None and not grad and any(c is sink.comp for c in comps):
        if isinstance(sink.comp, Edges):
            if sink.rows == lq:  # every chunk's probabilities written by the forward
                return _trimmed(sink.indptr, sink.indices, sink.values, sink.indices.numel(),
                                B, hkv, g)
        elif sink.counts is None:
            return _weights_from_sink(qs, k, ctx, lse, sink)
        elif sink.rows == lq:  # a masked band, every chunk appended by the forward
            if sink.nnz > sink.indices.numel():
                raise RuntimeError("masked band weights: more pairs than the buffers hold")
            indptr = torch.zeros(lq + 1, dtype=torch.long, device=qs.device)
            indptr[1:] = torch.cumsum(sink.counts, 0)
            return _trimmed(indptr, sink.indices, sink.values, sink.nnz, B, hkv, g)
    if lse is None:
        raise RuntimeError("pair_weights needs the forward's log-sum-exp here")
    fast = next((i for i, c in enumerate(comps) if _native_weights_ok(c, qs, k, ctx, lse, grad)),
                None)
    if fast is not None and len(comps) == 1:
        # no forward wrote them: the band kernel, afterwards (a union's layout is made by the
        # forward's chunks, see weights_sink; without one, the general path below)
        return _weights_from_sink(qs, k, ctx, lse, _band_sink(qs, k, comps, ctx, fast))
    if ctx.q_scale != 1.0:  # the band kernel took the queries unscaled (scale_in_kernel)
        qs = qs * ctx.q_scale
    # rows: the kernels' memory bound, and a score buffer (candidates x heads) that fits in
    # cache; not smaller, as a chunk costs a few Python-level steps per component (per offset)
    per_row = max(1, sum(c.cost(lq, lk) for c in comps) // max(lq, 1)) * B * hkv * g
    rows = min(chunk_rows(comps, ctx, d),
               max(BLOCK, WEIGHTS_CHUNK_ELEMENTS // per_row // BLOCK * BLOCK), max(lq, 1))
    dead = bool(torch.isneginf(lse).any())
    counts = torch.zeros(lq, dtype=torch.long, device=device)
    # Chunks write into buffers sized by the plan's candidates (an upper bound on nnz), not
    # into a list concatenated at the end (a second copy of every value).
    bound = sum(c.cost(lq, lk) for c in comps)
    indices = _weights_empty((bound,), index_dtype(bound, lk), device)
    values = _weights_empty((B * hkv * g, bound), lse.dtype, device)
    nnz = 0
    for q0 in range(0, lq, rows):
        q1 = min(lq, q0 + rows)
        ck, cj, cv = [], [], []
        for c in comps:
            scored = component_scores(c, qs, k, q0, q1, ctx, masked=False, minus=lse)
            if scored is None:
                continue
            s, qi, kj, valid = scored  # s: log-weights, score - lse of the row
            layout = s.shape[3:]
            valid = torch.broadcast_to(valid, layout)
            pick = valid.reshape(-1).nonzero().squeeze(1)  # allowed candidates, row-major
            if pick.numel() == 0:
                continue
            # gather, not index_select: along the last dim it is ~15x faster on CPU
            at = pick.expand(B * hkv * g, -1)
            direct = not grad and len(comps) == 1 and not dead
            if direct:  # one component: straight into the output, no intermediate copy
                w = values[:, nnz:nnz + pick.numel()]
                torch.gather(s.reshape(B * hkv * g, -1), 1, at, out=w)
                torch.exp(w, out=w)
            else:
                w = torch.gather(s.reshape(B * hkv * g, -1), 1, at).exp_()
            if dead:
                lse_q = lse.index_select(3, qi.reshape(-1)).view(B, hkv, g, *qi.shape)
                gone = torch.broadcast_to(torch.isneginf(lse_q), (B, hkv, g, *layout))
                w = w.masked_fill(torch.gather(gone.reshape(B * hkv * g, -1), 1, at), 0.0)
            if qi.dim() == valid.dim() and qi.shape[-1] == 1:  # one row per line of valid
                counts.index_add_(0, qi.reshape(-1), valid.sum(-1).reshape(-1))
                qsel = None
            else:
                qsel = torch.broadcast_to(qi, layout).reshape(-1).index_select(0, pick)
                counts.index_add_(0, qsel, torch.ones_like(qsel))
            kj_sel = torch.broadcast_to(kj, layout).reshape(-1).index_select(0, pick)
            if len(comps) > 1:
                if qsel is None:
                    qsel = torch.broadcast_to(qi, layout).reshape(-1).index_select(0, pick)
                ck.append(qsel * max(lk, 1) + kj_sel)
            cj.append(kj_sel)
            cv.append(w)
        if not cj:
            continue
        if len(cj) == 1:
            # a component lists its pairs sorted (see component_scores): already CSR order
            col, val = cj[0], cv[0]
        else:
            pos = merge_positions(ck)
            total = sum(c_.numel() for c_ in cj)
            col, val = place(cj, pos, total), place(cv, pos, total)
        n = col.numel()
        indices[nnz:nnz + n] = col
        if not direct:
            values[:, nnz:nnz + n] = val
        nnz += n
    indptr = torch.zeros(lq + 1, dtype=torch.long, device=device)
    indptr[1:] = torch.cumsum(counts, 0)
    return _trimmed(indptr, indices, values, nnz, B, hkv, g)


def _trimmed(indptr: Tensor, indices: Tensor, values: Tensor, nnz: int, B: int, hkv: int,
             g: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR buffers sized by the candidates, cut to their first ``nnz`` pairs, and
    ``indptr`` (int64 where it was built) in the indices' dtype."""
    indptr = indptr.to(indices.dtype)
    bound = indices.numel()
    indices, values = indices[:nnz], values[:, :nnz]
    if nnz < 0.75 * bound:  # masks cut many candidates: keep only the allowed pairs' memory
        indices, values = indices.clone(), values.clone()
    return indptr, indices, values.view(B, hkv, g, nnz)


def _native_weights_ok(c: Component, qs: Tensor, k: Tensor, ctx: Ctx, lse: Tensor,
                       grad: bool) -> bool:
    """Whether the compiled band kernel can write component ``c``'s weights exactly: an
    unmasked band without bias or ``score_mod``, fp32/fp64 on the CPU, no autograd."""
    return (isinstance(c, Ranges) and c.band is not None and not c.masks and not grad
            and ctx.bias is None and ctx.score_mod is None and qs.shape[-1] > 0
            and c.band[1] - c.band[0] + 1 <= native.BAND_MAX_WIDTH
            and all(t.device.type == "cpu" and t.dtype == qs.dtype for t in (k, lse))
            and qs.device.type == "cpu" and qs.dtype in (torch.float32, torch.float64)
            and native.band_available())


def weights_sink(qs: Tensor, k: Tensor, v: Tensor, comps: list[Component], ctx: Ctx,
                 nnz: int | None = None) -> WeightsSink | None:
    """CSR buffers for the compiled band forward to write the weights of a plan's unmasked
    band as it computes them, or None where :func:`pair_weights` computes them afterwards
    (autograd; no such band). In a union the other components run first in each chunk, their
    pairs are placed as their kernels hand them out, and the band kernel folds their
    log-sum-exp into the weights it writes (no second pass over the values).
    A plan of one masked band (the PyTorch band kernel) or of one offset list appends its
    probabilities chunk by chunk instead (into buffers of ``nnz`` pairs where the caller knows
    them without listing them, else of its candidates, cut afterwards); a plan of one edge list
    has the weights' layout already, and the CSR edge kernel writes each chunk's probabilities
    at their slots.

    Args: as :func:`pair_weights` (``v``: the values, for the autograd check); ``nnz``: the
    plan's allowed pairs, or None."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qs, k, v))
    fast = next((i for i, c in enumerate(comps) if _native_weights_ok(c, qs, k, ctx, qs, grad)),
                None)
    if fast is not None:
        return _band_sink(qs, k, comps, ctx, fast)
    c = comps[0] if len(comps) == 1 else None
    if (isinstance(c, Edges) and not c.masks and not grad and ctx.dropout_p == 0
            and uses_sparse_mm(qs, k, v)):
        # one edge list (random keys, a graph): its pairs in CSR order are the weights'
        # layout, so the CSR edge kernel writes each chunk's probabilities at their slots
        B, hkv, g, lq, _ = qs.shape
        dtype = index_dtype(c.cost(lq, ctx.lk), ctx.lk)
        return WeightsSink(c, _weights_empty((B * hkv * g, c.cost(lq, ctx.lk)), qs.dtype,
                                             qs.device), qs.new_empty(0),
                           c.indices.to(qs.device, dtype, copy=True),
                           indptr=c.indptr.to(qs.device, dtype, copy=True))
    if not grad and ctx.dropout_p == 0 and (
            isinstance(c, Offsets) or isinstance(c, Ranges) and c.band is not None and c.masks
            and ctx.bias is None and ctx.score_mod is None):
        # one masked band (dilated) or offset list (exponential, dilated): the PyTorch band
        # kernel or the offsets kernel appends its probabilities
        B, hkv, g, lq, _ = qs.shape
        bound = c.cost(lq, ctx.lk) if nnz is None else nnz  # at least its allowed pairs
        dtype = torch.float32 if qs.dtype in (torch.float16, torch.bfloat16) else qs.dtype
        return WeightsSink(c, _weights_empty((B * hkv * g, bound), dtype, qs.device),
                           qs.new_empty(0),
                           _weights_empty((bound,), index_dtype(bound, ctx.lk), qs.device),
                           counts=torch.zeros(lq, dtype=torch.long, device=qs.device))
    return None


def _band_sink(qs: Tensor, k: Tensor, comps: list[Component], ctx: Ctx, fast: int
               ) -> WeightsSink:
    """The CSR buffers of a plan whose component ``fast`` is an unmasked band: the band's keys
    of row ``i`` are one contiguous run (the components are disjoint and a band is
    contiguous). Alone, its layout is closed-form. In a union, the buffers are sized by the
    plan's candidates (an upper bound; the unused tail is never touched) and the forward lays
    out each chunk of rows as it goes (:func:`.structured._chunk`): nothing is listed up
    front."""
    B, hkv, g, lq, _ = qs.shape
    lk, device = ctx.lk, qs.device
    band = comps[fast]
    others = comps[:fast] + comps[fast + 1:]
    if others:
        bound = sum(c.cost(lq, lk) for c in comps)
        return WeightsSink(band, _weights_empty((B * hkv * g, bound), qs.dtype, device),
                           torch.empty(lq, dtype=torch.long, device=device),
                           _weights_empty((bound,), index_dtype(bound, lk), device),
                           indptr=torch.zeros(lq + 1, dtype=torch.long, device=device),
                           others=others)
    lo, hi = band.band
    rows = torch.arange(lq, device=device)
    start = (rows + (lk - lq) + lo).clamp(0, lk)
    n_band = ((rows + (lk - lq) + hi + 1).clamp(0, lk) - start).clamp_min(0)
    indptr = torch.zeros(lq + 1, dtype=torch.long, device=device)
    indptr[1:] = torch.cumsum(n_band, 0)
    nnz = int(indptr[-1])
    return WeightsSink(band, _weights_empty((B * hkv * g, nnz), qs.dtype, device), indptr[:-1],
                       _weights_empty((nnz,), index_dtype(nnz, lk), device),
                       indptr=indptr)


def _weights_from_sink(qs: Tensor, k: Tensor, ctx: Ctx, lse: Tensor, sink: WeightsSink
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`pair_weights` from a sink (:func:`_band_sink`): each row as the forward laid it
    out, the band's runs as the forward wrote them (normalized by the whole row in a union,
    see :func:`weights_sink`), or written now by the compiled band kernel where the forward
    took another kernel."""
    B, hkv, g, lq, _ = qs.shape
    if sink.rows != lq:  # the forward did not write them all (it took another kernel)
        lo, hi = sink.comp.band
        native.band_weights(qs, k, lse, lo, hi, sink.values, sink.offsets, sink.indices,
                            scale=ctx.q_scale)
    if not sink.others:
        return _trimmed(sink.indptr, sink.indices, sink.values, sink.indices.numel(), B, hkv, g)
    sink.indptr[lq] = sink.nnz
    return _trimmed(sink.indptr, sink.indices, sink.values, sink.nnz, B, hkv, g)
