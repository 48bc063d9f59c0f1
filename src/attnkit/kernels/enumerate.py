"""Enumerate the allowed pairs of a plan (for ``.csr``, ``.nnz`` and sparse weights).

Works chunk by chunk over queries, so memory is O(nnz) plus one chunk of candidates. Each
component lists its pairs of a chunk already sorted (query, then key); the components of a plan
are disjoint, so a chunk's CSR order is a merge of sorted lists, placed by binary search
(:func:`_merge_positions`) instead of a sort of every pair.
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import Tensor

from . import native
from .components import Component, Ranges, RowSet
from .structured import BLOCK, Ctx, WeightsSink, chunk_rows, component_scores, lower

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


def _merge_positions(keys: list[Tensor]) -> list[Tensor]:
    """Where each element of disjoint, sorted key lists lands in their merged sorted order.

    An element's merged position is its index in its own list plus, for every other list, the
    number of that list's keys below it (a binary search). Only the smaller lists are searched
    for; the largest one takes the remaining slots in order, so the work is about
    ``n_small * log(n)`` plus one pass over the output, not a sort of every pair."""
    if len(keys) == 1:
        return [torch.arange(keys[0].numel(), device=keys[0].device)]
    big = max(range(len(keys)), key=lambda i: keys[i].numel())
    total = sum(k_.numel() for k_ in keys)
    device = keys[0].device
    free = torch.ones(total, dtype=torch.bool, device=device)
    out: list[Tensor | None] = [None] * len(keys)
    for i, key in enumerate(keys):
        if i == big:
            continue
        pos = torch.arange(key.numel(), device=device)
        for j, other in enumerate(keys):
            if j != i and other.numel() and key.numel():
                pos = pos + torch.searchsorted(other, key)
        free[pos] = False
        out[i] = pos
    out[big] = free.nonzero().squeeze(1)
    return out


def _place(parts: list[Tensor], pos: list[Tensor], total: int) -> Tensor:
    """Scatter ``parts`` (along their last dim) to positions ``pos`` of one tensor."""
    lead = parts[0].shape[:-1]
    rows = math.prod(lead)
    flat = [p_.reshape(rows, p_.shape[-1]) for p_ in parts]
    out = flat[0].new_empty(rows, total)
    for f, p_ in zip(flat, pos):
        if f.shape[-1] and rows:
            out.scatter_(1, p_.expand(f.shape[0], -1), f)  # in place on a fresh buffer: autograd ok
    return out.view(*lead, total)


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
            keys.append(_place(parts, _merge_positions(parts), sum(p_.numel() for p_ in parts)))
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


def pair_weights(qs: Tensor, k: Tensor, comps: list[Component], ctx: Ctx, lse: Tensor,
                 scores: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The attention weights of every allowed pair in CSR order, ``exp(score - lse)``.

    Args:
        qs: pre-scaled queries ``(B, Hkv, G, Lq, D)``; k: keys ``(B, Hkv, Lk, D)``.
        comps: the plan's (lowered) components, as the forward ran them.
        ctx: the forward's context (bias, ``score_mod``).
        lse: the forward's log-sum-exp ``(B, Hkv, G, Lq)`` over all components.
        scores: return the finished scores instead (``lse`` unused but for its dtype).

    Returns:
        ``indptr (Lq + 1,)``, ``indices (nnz,)`` (the pattern's :meth:`csr`) and
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
    if sink is not None and not grad and not scores and any(c is sink.comp for c in comps):
        if sink.counts is None:
            return _weights_from_sink(qs, k, ctx, lse, sink)
        if sink.rows == lq:  # a masked band, every chunk appended by the forward
            indptr = torch.zeros(lq + 1, dtype=torch.long, device=qs.device)
            indptr[1:] = torch.cumsum(sink.counts, 0)
            return _trimmed(indptr, sink.indices, sink.values, sink.nnz, B, hkv, g)
    if lse is None:
        raise RuntimeError("pair_weights needs the forward's log-sum-exp here")
    fast = next((i for i, c in enumerate(comps) if _native_weights_ok(c, qs, k, ctx, lse, grad)),
                None)
    if fast is not None and not scores:  # no forward wrote them: the band kernel, afterwards
        return _weights_from_sink(qs, k, ctx, lse, _band_sink(qs, k, comps, ctx, fast))
    # rows: the kernels' memory bound, and a score buffer (candidates x heads) that fits in
    # cache; not smaller, as a chunk costs a few Python-level steps per component (per offset)
    per_row = max(1, sum(c.cost(lq, lk) for c in comps) // max(lq, 1)) * B * hkv * g
    rows = min(chunk_rows(comps, ctx, d),
               max(BLOCK, WEIGHTS_CHUNK_ELEMENTS // per_row // BLOCK * BLOCK), max(lq, 1))
    dead = not scores and bool(torch.isneginf(lse).any())
    counts = torch.zeros(lq, dtype=torch.long, device=device)
    # Chunks write into buffers sized by the plan's candidates (an upper bound on nnz), not
    # into a list concatenated at the end (a second copy of every value).
    bound = sum(c.cost(lq, lk) for c in comps)
    indices = torch.empty(bound, dtype=torch.long, device=device)
    values = lse.new_empty(B * hkv * g, bound)
    nnz = 0
    for q0 in range(0, lq, rows):
        q1 = min(lq, q0 + rows)
        ck, cj, cv = [], [], []
        for c in comps:
            scored = component_scores(c, qs, k, q0, q1, ctx, masked=False,
                                      minus=None if scores else lse)
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
                if not scores:
                    torch.exp(w, out=w)
            else:
                w = torch.gather(s.reshape(B * hkv * g, -1), 1, at)
                if not scores:
                    w = w.exp_()
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
            pos = _merge_positions(ck)
            total = sum(c_.numel() for c_ in cj)
            col, val = _place(cj, pos, total), _place(cv, pos, total)
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
    """CSR buffers sized by the candidates, cut to their first ``nnz`` pairs."""
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


def weights_sink(qs: Tensor, k: Tensor, v: Tensor, comps: list[Component], ctx: Ctx
                 ) -> WeightsSink | None:
    """CSR buffers for the compiled band forward to write the weights of a plan's unmasked
    band as it computes them, or None where :func:`pair_weights` computes them afterwards
    (autograd; no such band). In a union the band's probabilities are normalized by its own
    log-sum-exp, which the sink keeps, and rescaled to the row's afterwards (one pass over the
    values instead of a second score GEMM); the other components' pairs get their places now.
    A plan of one masked band (the PyTorch band kernel) appends its probabilities chunk by
    chunk instead.

    Args: as :func:`pair_weights` (``v``: the values, for the autograd check)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qs, k, v))
    fast = next((i for i, c in enumerate(comps) if _native_weights_ok(c, qs, k, ctx, qs, grad)),
                None)
    if fast is not None:
        return _band_sink(qs, k, comps, ctx, fast)
    c = comps[0] if len(comps) == 1 else None
    if (isinstance(c, Ranges) and c.band is not None and c.masks and not grad
            and ctx.bias is None and ctx.score_mod is None and ctx.dropout_p == 0):
        # one masked band (dilated): the PyTorch band kernel appends its probabilities
        B, hkv, g, lq, _ = qs.shape
        bound = c.cost(lq, ctx.lk)  # its candidates: at least its allowed pairs
        dtype = torch.float32 if qs.dtype in (torch.float16, torch.bfloat16) else qs.dtype
        return WeightsSink(c, qs.new_empty(B * hkv * g, bound, dtype=dtype), qs.new_empty(0),
                           torch.empty(bound, dtype=torch.long, device=qs.device),
                           counts=torch.zeros(lq, dtype=torch.long, device=qs.device))
    return None


def _band_sink(qs: Tensor, k: Tensor, comps: list[Component], ctx: Ctx, fast: int
               ) -> WeightsSink:
    """The CSR layout of a plan whose component ``fast`` is an unmasked band, with buffers:
    the band's keys of row ``i`` are one contiguous run (the components are disjoint and a band
    is contiguous), placed after the other components' keys of the row below the band's start.
    The other components' pairs (few: global rows and keys, offsets) are listed now (their keys
    written to ``indices``), with buffers where their kernels put their scores as the forward
    computes them (their weights need the row's log-sum-exp, known after the forward); every
    place is found in closed form or by binary search, no sort."""
    B, hkv, g, lq, _ = qs.shape
    lk, device = ctx.lk, qs.device
    band = comps[fast]
    lo, hi = band.band
    rows = torch.arange(lq, device=device)
    start = (rows + (lk - lq) + lo).clamp(0, lk)
    n_band = ((rows + (lk - lq) + hi + 1).clamp(0, lk) - start).clamp_min(0)
    others = comps[:fast] + comps[fast + 1:]
    o_rows = o_idx = None
    if others:
        # each component's pairs sorted, then their places among all the others' pairs
        keys = [(lambda rc: rc[0] * max(lk, 1) + rc[1])(allowed_pairs([c], lq, lk, device))
                for c in others]
        where = _merge_positions(keys)
        o_key = _place(keys, where, sum(t.numel() for t in keys))  # sorted: CSR order
        o_rows, o_idx = o_key // max(lk, 1), o_key % max(lk, 1)
        o_count = torch.bincount(o_rows, minlength=lq)
        o_ptr = torch.zeros(lq + 1, dtype=torch.long, device=device)
        o_ptr[1:] = torch.cumsum(o_count, 0)
        o_below = torch.searchsorted(o_key, rows * max(lk, 1) + start) - o_ptr[:-1]
    else:
        o_count = o_below = torch.zeros(lq, dtype=torch.long, device=device)
    indptr = torch.zeros(lq + 1, dtype=torch.long, device=device)
    indptr[1:] = torch.cumsum(n_band + o_count, 0)
    nnz = int(indptr[-1])
    values = qs.new_empty(B * hkv * g, nnz)
    indices = torch.empty(nnz, dtype=torch.long, device=device)
    sink = WeightsSink(band, values, indptr[:-1] + o_below, indices, indptr=indptr,
                       others=others, other_rows=o_rows)
    if others:
        # a pair's place: its row's start, the other components' pairs of the row before it,
        # and the band's keys of the row below its key
        first = indptr[:-1].index_select(0, o_rows)
        own = torch.arange(o_idx.numel(), device=device) - o_ptr[:-1].index_select(0, o_rows)
        band_below = (o_idx - start.index_select(0, o_rows)).clamp(0).minimum(
            n_band.index_select(0, o_rows))
        sink.other_pos = first + own + band_below
        sink.captures = [[qs.new_empty(B * hkv * g, t.numel()), 0] for t in keys]
        sink.capture_where = where
        indices[sink.other_pos] = o_idx
        sink.lse = qs.new_full((B, hkv, g, lq), float("-inf"))
    return sink


def _scale_rows(values: Tensor, indptr: Tensor, factor: Tensor) -> None:
    """``values[:, indptr[i]:indptr[i + 1]] *= factor[:, i]`` in place, a cache-sized block of
    rows at a time (one expanded factor per block, not one of the size of ``values``)."""
    heads, lq = factor.shape
    bounds = indptr.tolist()
    lens = indptr.diff()
    step = max(1, WEIGHTS_CHUNK_ELEMENTS // max(heads, 1))
    r0 = 0
    while r0 < lq:
        r1 = min(lq, max(r0 + 1, bisect.bisect_right(bounds, bounds[r0] + step) - 1))
        a, b = bounds[r0], bounds[r1]
        if b > a:
            f = factor[:, r0:r1].repeat_interleave(lens[r0:r1], dim=1, output_size=b - a)
            values[:, a:b].mul_(f)
        r0 = r1


def _weights_from_sink(qs: Tensor, k: Tensor, ctx: Ctx, lse: Tensor, sink: WeightsSink
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`pair_weights` from a sink (:func:`_band_sink`): the band's run of each row as the
    forward wrote it (rescaled from the band's log-sum-exp to the row's in a union), or written
    now by the compiled band kernel where the forward took another kernel; the other
    components' weights from :func:`pair_weights`, copied to their places."""
    B, hkv, g, lq, _ = qs.shape
    values = sink.values
    if sink.rows != lq:  # the forward did not write them all (it took another kernel)
        lo, hi = sink.comp.band
        native.band_weights(qs, k, lse, lo, hi, values, sink.offsets, sink.indices)
    elif sink.lse is not None:
        # p = exp(s - lse_band) -> exp(s - lse); rows without any weight (lse = -inf) get 0
        factor = torch.where(torch.isneginf(lse), 0.0, torch.exp(sink.lse - lse))
        _scale_rows(values, sink.indptr, factor.reshape(B * hkv * g, lq))
    if sink.other_pos is not None and sink.other_pos.numel():
        # every other slot of a row was scaled above too: overwritten here
        if all(n == buf.shape[1] for buf, n in sink.captures):  # the forward gave the scores
            o_s = _place([buf for buf, _ in sink.captures], sink.capture_where,
                         sink.other_pos.numel())
        else:  # a kernel that does not hand out its scores: one more scoring pass
            o_s = pair_weights(qs, k, sink.others, ctx, lse, scores=True)[2]
        row_lse = lse.reshape(B * hkv * g, lq).index_select(1, sink.other_rows)
        o_val = (o_s.reshape(B * hkv * g, -1) - row_lse).exp_()
        o_val = o_val.masked_fill_(torch.isneginf(row_lse), 0.0)
        values.index_copy_(1, sink.other_pos, o_val)
    indptr = sink.indptr
    if indptr is None:
        indptr = torch.cat([sink.offsets, sink.offsets.new_tensor([sink.indices.numel()])])
    return indptr, sink.indices, values.view(B, hkv, g, -1)
