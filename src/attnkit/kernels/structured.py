"""Structured sparse attention kernels, in plain PyTorch tensor ops.

Every kernel computes, for a chunk of queries ``[q0, q1)`` and one plan component, the softmax
restricted to that component's allowed pairs: a normalized output ``(B, Hkv, G, nq, Dv)`` and its
log-sum-exp ``(B, Hkv, G, nq)`` (``-inf`` for rows with no allowed key). Components of a plan are
disjoint, so their partial results merge exactly through the log-sum-exp (as in FlashAttention's
online softmax). No kernel ever forms an ``Lq x Lk`` tensor unless its component is dense.

Queries arrive pre-scaled (``scale / temperature`` folded in) in the grouped layout
``(B, Hkv, G, Lq, D)`` with ``G = Hq // Hkv``; keys and values stay ``(B, Hkv, Lk, D)``, so
grouped-query attention never copies K or V per query head.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from . import csr, native
from .components import (
    AllKeys,
    Band,
    Component,
    Edges,
    KeySet,
    Offsets,
    Ranges,
    RowSet,
    band_ranges,
)

NEG_INF = float("-inf")
# Elements in the largest intermediate of one chunk; bounds peak memory per chunk (~64 MB fp32).
CHUNK_ELEMENTS = 1 << 24
# Query rows per block in the range kernel: a block shares one gathered key window.
BLOCK = 32


def index_dtype(slots: int, lk: int) -> torch.dtype:
    """The integer dtype of the weights' CSR ``indptr`` and ``indices`` for buffers of
    ``slots`` pairs over ``lk`` keys: int32 where every slot and key fits (as scipy chooses;
    at one fp32 head a third less memory than int64, and fewer fresh pages to write), else
    int64."""
    return torch.int32 if max(slots, lk) <= 2**31 - 1 else torch.int64


@dataclass
class WeightsSink:
    """Where a forward kernel writes component ``comp``'s probabilities in CSR order (see
    :func:`.enumerate.weights_sink`): for a band, row ``i``'s run at ``values[:, offsets[i]:]``
    and its keys in ``indices``; for an edge list (``offsets`` empty), its pairs' slots, with
    ``indptr``/``indices`` its own. ``rows`` counts the query rows done (all ``Lq`` of them, or
    the weights are computed afterwards)."""

    comp: Component
    values: Tensor  # (B * Hq, nnz), or (B * Hq, candidates) in a union or a masked band
    offsets: Tensor  # (Lq,) int64
    indices: Tensor  # (nnz,) or (candidates,) in a union; of index_dtype(candidates, Lk)
    rows: int = 0
    #: a union: the plan's ``indptr (Lq + 1,)`` and its other components. Chunk by chunk
    #: (:func:`_chunk`) their kernels hand out their pairs' scores (:func:`capture_scores`,
    #: into ``pending``), which place the chunk's rows in CSR order (``nnz`` so far) before the
    #: band kernel writes its runs, normalized by the whole row through the others'
    #: log-sum-exp ``other_lse (B, Hkv, G, nq)``; row sets run once before the chunks (their
    #: pairs ``row_pairs``: sorted keys ``row * Lk + key`` and scores, and ``rows_lse``).
    indptr: Tensor | None = None
    others: list[Component] = field(default_factory=list)
    pending: list[tuple[Component, Tensor, Tensor]] = field(default_factory=list)
    row_pairs: tuple[Tensor, Tensor] | None = None
    other_lse: Tensor | None = None
    rows_lse: Tensor | None = None
    #: a masked band (the PyTorch band kernel) or an offset list: its chunks append their
    #: allowed pairs, so ``values``/``indices`` are sized by the allowed pairs where known up
    #: front, else by the candidates, and ``counts (Lq,)`` per row are filled as the chunks
    #: go; ``nnz`` pairs written so far
    counts: Tensor | None = None
    nnz: int = 0

    def append(self, keys: Tensor, pick: Tensor, counts: Tensor, q0: int) -> tuple[int, int]:
        """Claim the next slots of an appending sink (``counts`` set) for a chunk's allowed
        pairs, in CSR order: their keys ``keys[pick]``, and ``counts`` per row from row ``q0``
        on. Returns ``(n0, n)``; the caller writes their weights to ``values[:, n0:n0 + n]``."""
        n0, n = self.nnz, pick.numel()
        torch.index_select(keys.to(self.indices.dtype), 0, pick, out=self.indices[n0:n0 + n])
        self.counts[q0:q0 + counts.numel()] = counts
        self.nnz += n
        self.rows += counts.numel()
        return n0, n


@dataclass
class Ctx:
    lq: int
    lk: int
    batch: int
    hkv: int
    groups: int
    bias: Tensor | None  # expanded view (B, Hq, Lq, Lk) or None
    score_mod: Callable | None
    dropout_p: float
    block: int = field(default_factory=lambda: BLOCK)
    need_lse: bool = True
    sparse_mm: bool = False  # edge components use the CSR kernels (fp32/fp64 inputs)
    #: the factor the queries still need (1: pre-scaled): a plan of one band that the compiled
    #: kernel runs without autograd takes it in the kernel (see :func:`scale_in_kernel`)
    q_scale: float = 1.0
    #: CSR buffers for the weights of one band component, filled by the compiled forward
    #: (see :func:`.enumerate.weights_sink`)
    weights_sink: WeightsSink | None = None
    _rows: tuple[Tensor, Tensor] | None = None

    def rows(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``k`` and ``v`` in row layout ``(B, Lk, Hkv, d)``, made once per call."""
        if self._rows is None:
            self._rows = (k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
        return self._rows

    @property
    def hq(self) -> int:
        return self.hkv * self.groups


# ----------------------------------------------------------------------------- shared steps


def finish_scores(s: Tensor, qi: Tensor, kj: Tensor, valid: Tensor | None, ctx: Ctx) -> Tensor:
    """Add bias, apply ``score_mod``, then mask. ``s`` is ``(B, Hkv, G, *S)``; ``qi``, ``kj``
    and ``valid`` broadcast to ``S`` (last dim: candidates); ``valid=None`` leaves the
    disallowed candidates unmasked (for callers that only read the allowed ones)."""
    if ctx.bias is not None:
        qb, kb = torch.broadcast_tensors(qi, kj)
        b = ctx.bias[:, :, qb, kb]  # (B, Hq, *S)
        s = s + b.reshape(s.shape).to(s.dtype)
    if ctx.score_mod is not None:
        shape = s.shape
        c = shape[-1]
        s4 = s.reshape(ctx.batch, ctx.hq, -1, c)
        qlast = qi.shape[-1]
        q4 = qi.expand(*shape[3:-1], qlast).reshape(1, 1, -1, qlast)
        k4 = kj.expand(*shape[3:]).reshape(1, 1, -1, c)
        b_idx = torch.arange(ctx.batch, device=s.device).view(-1, 1, 1, 1)
        h_idx = torch.arange(ctx.hq, device=s.device).view(1, -1, 1, 1)
        s4 = ctx.score_mod(s4, b_idx, h_idx, q4, k4)
        if not isinstance(s4, Tensor) or s4.numel() != s.numel():
            raise ValueError(
                "score_mod must return a tensor of the same shape as its `score` argument"
            )
        s = s4.reshape(shape)
    return s if valid is None else s.masked_fill(~valid, NEG_INF)


def softmax_rows(s: Tensor, ctx: Ctx, training: bool) -> tuple[Tensor, Tensor]:
    """Normalized weights over the last dim and their log-sum-exp; empty rows give 0 / -inf.
    Without autograd ``s`` (the caller's own fresh scores) becomes the weights in place, so no
    temporary of its size is made."""
    if s.shape[-1] == 0:
        return s, torch.full(s.shape[:-1], NEG_INF, dtype=s.dtype, device=s.device)
    m = s.detach().amax(-1, keepdim=True)  # the max cancels exactly: no gradient needed
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    in_place = not s.requires_grad
    p = s.sub_(m).exp_() if in_place else torch.exp(s - m)
    lsum = p.sum(-1, keepdim=True)
    nonempty = lsum > 0
    lsum_safe = torch.where(nonempty, lsum, torch.ones_like(lsum))
    p = p.div_(lsum_safe) if in_place else p / lsum_safe
    lse = torch.where(nonempty, m + torch.log(lsum_safe), torch.full_like(m, NEG_INF))
    if ctx.dropout_p > 0 and training:
        p = F.dropout(p, ctx.dropout_p, training=True)
    return p, lse.squeeze(-1)


def merge(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Merge normalized partial results of disjoint key sets through their log-sum-exps."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])  # (P, ...)
    m = lses.detach().amax(0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lses - m)  # (P, ...)
    total = w.sum(0)
    nonempty = total > 0
    total_safe = torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(nonempty, m + torch.log(total_safe), torch.full_like(m, NEG_INF))
    share = (w / total_safe).unsqueeze(-1)  # (P, ..., 1)
    first = parts[0][0]
    if (not torch.is_grad_enabled() or not any(o.requires_grad for o, _ in parts)) and all(
            o.dtype == first.dtype and o.shape == first.shape for o, _ in parts) \
            and first.is_contiguous():
        # without autograd the parts are this call's own fresh outputs: scaled and summed
        # into the first in place, not into new full-size temporaries (one per part and sum)
        out = first.mul_(share[0])
        for i in range(1, len(parts)):
            out.addcmul_(parts[i][0], share[i])
        return out, lse
    out = sum(o * share[i] for i, (o, _) in enumerate(parts))
    return out, lse


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _no_keys(qs: Tensor, nq: int, dv: int) -> tuple[Tensor, Tensor]:
    """The partial result of ``nq`` query rows without any key: zeros and ``-inf`` lse."""
    B, hkv, g = qs.shape[:3]
    return (qs.new_zeros(B, hkv, g, nq, dv),
            torch.full((B, hkv, g, nq), NEG_INF, dtype=_compute_dtype(qs), device=qs.device))


def capture_scores(comp: Component, s: Tensor, qi: Tensor, kj: Tensor, valid: Tensor,
                   ctx: Ctx) -> None:
    """Hand the finished scores ``s (B, Hkv, G, *S)`` of a chunk's allowed pairs (``valid``;
    ``qi``, ``kj`` and ``valid`` broadcast to ``S``, whose row-major order is CSR order) to
    the weights sink, where ``comp`` is one of the other components of a union whose band
    writes its weights (see :func:`.enumerate.weights_sink`): ``comp``, their keys
    ``qi * Lk + kj`` (sorted) and scores ``(B * Hq, n)`` go to ``sink.pending`` for
    :func:`_chunk` to place, so
    the weights need no second scoring pass."""
    sink = ctx.weights_sink
    if sink is None or not any(c is comp for c in sink.others):
        return
    layout = s.shape[3:]
    pick = torch.broadcast_to(valid, layout).reshape(-1).nonzero().squeeze(1)
    keys = torch.broadcast_to(qi * max(ctx.lk, 1) + kj, layout).reshape(-1).index_select(0, pick)
    heads = s.shape[0] * s.shape[1] * s.shape[2]
    sink.pending.append((comp, keys,
                         torch.gather(s.reshape(heads, -1), 1, pick.expand(heads, -1))))


def merge_positions(keys: list[Tensor]) -> list[Tensor]:
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


def place(parts: list[Tensor], pos: list[Tensor], total: int) -> Tensor:
    """Scatter ``parts`` (along their last dim) to positions ``pos`` of one tensor."""
    lead = parts[0].shape[:-1]
    rows = math.prod(lead)
    flat = [p_.reshape(rows, p_.shape[-1]) for p_ in parts]
    out = flat[0].new_empty(rows, total)
    for f, p_ in zip(flat, pos):
        if f.shape[-1] and rows:
            out.scatter_(1, p_.expand(f.shape[0], -1), f)  # in place on a fresh buffer: autograd ok
    return out.view(*lead, total)


def _merged_pairs(pairs: list[tuple]) -> tuple[Tensor, Tensor] | None:
    """The sorted ``(..., keys, scores)`` lists of disjoint components merged into one
    ``(keys, scores)``, or None when they hold no pair."""
    pairs = [p_[-2:] for p_ in pairs if p_[-2].numel()]
    if len(pairs) <= 1:
        return pairs[0] if pairs else None
    pos = merge_positions([k_ for k_, _ in pairs])
    total = sum(k_.numel() for k_, _ in pairs)
    return place([k_ for k_, _ in pairs], pos, total), place([s_ for _, s_ in pairs], pos, total)


def _place_chunk(sink: WeightsSink, qs: Tensor, k: Tensor, others: list[Component], q0: int,
                 q1: int, ctx: Ctx) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The CSR layout of a union's rows ``[q0, q1)`` (:class:`WeightsSink`): ``indptr``, the
    band runs' ``offsets`` and the other components' keys in ``indices``, from the pairs their
    kernels just handed out (scored here for a kernel that does not), in one compiled pass
    (:func:`.native.union_layout`). Returns per list of pairs their ``(slots (n,), rows (n,)
    relative to q0, scores (B * Hq, n))``."""
    for c in others:
        if not any(e[0] is c for e in sink.pending):  # a kernel that does not hand them out
            scored = component_scores(c, qs, k, q0, q1, ctx, masked=False)
            if scored is not None:
                capture_scores(c, *scored, ctx)
    caught, sink.pending = [e[1:] for e in sink.pending if e[1].numel()], []
    lk = max(ctx.lk, 1)
    if sink.row_pairs is not None:  # the row sets' pairs of these rows
        keys, scores = sink.row_pairs
        a, b = (int(x) for x in torch.searchsorted(keys, keys.new_tensor([q0 * lk, q1 * lk])))
        if b > a:
            caught.append((keys[a:b], scores[:, a:b]))
    if len(caught) > native.UNION_MAX_LISTS:
        caught = [_merged_pairs(caught)]
    lo, hi = sink.comp.band
    pos, sink.nnz = native.union_layout(sink.indptr[q0:q1], sink.offsets[q0:q1], sink.indices,
                                        [keys for keys, _ in caught], q0, ctx.lq, ctx.lk, lo,
                                        hi, sink.nnz)
    return [(p_, keys // lk - q0, scores) for p_, (keys, scores) in zip(pos, caught)]


# ----------------------------------------------------------------------------- kernels


def _range_scores(comp: Ranges, qs, k, q0, q1, ctx: Ctx):
    """Finished scores ``(B, Hkv, G, nb, bq, C)`` of a ranges component's query blocks over
    each block's shared key window, with that window's gathered keys ``(B, Hkv, nb, C, D)``
    and ``kj (nb, 1, C)``, ``valid (nb, bq, C)``; None when no query in ``[q0, q1)`` has a
    key."""
    B, hkv, g, _, d = qs.shape
    bq = ctx.block
    nq = q1 - q0
    cand = comp.block_candidates(q0, q1, ctx.lq, ctx.lk, bq, qs.device)
    if cand is None:
        return None
    qi, kj, valid = cand
    nb, width = valid.shape[0], valid.shape[2]
    pad = nb * bq - nq
    qc = qs[:, :, :, q0:q1]
    if pad:
        qc = F.pad(qc, (0, 0, 0, pad))
    qc = qc.view(B, hkv, g, nb, bq, d).transpose(2, 3).reshape(B, hkv, nb, g * bq, d)
    kc = k.index_select(2, kj.reshape(-1)).view(B, hkv, nb, width, d)
    s = torch.matmul(qc, kc.transpose(-1, -2)).to(_compute_dtype(qs))  # (B,hkv,nb,g*bq,C)
    s = s.view(B, hkv, nb, g, bq, width).transpose(2, 3)  # (B,hkv,g,nb,bq,C)
    return finish_scores(s, qi, kj, valid, ctx), qi, kj, valid


def _ranges_partial(comp: Ranges, qs, k, v, q0, q1, ctx: Ctx, training: bool):
    """Blocked kernel for per-query contiguous key ranges (bands, segments)."""
    B, hkv, g, _, _ = qs.shape
    dv = v.shape[-1]
    bq = ctx.block
    nq = q1 - q0
    scored = _range_scores(comp, qs, k, q0, q1, ctx)
    if scored is None:
        return _no_keys(qs, nq, dv)
    s, _, kj, valid = scored
    nb, width = valid.shape[0], valid.shape[2]
    vc = v.index_select(2, kj.reshape(-1)).view(B, hkv, nb, width, dv)
    p, lse = softmax_rows(s, ctx, training)
    p = p.to(v.dtype).transpose(2, 3).reshape(B, hkv, nb, g * bq, width)
    out = torch.matmul(p, vc).view(B, hkv, nb, g, bq, dv).transpose(2, 3)
    out = out.reshape(B, hkv, g, nb * bq, dv)[:, :, :, :nq]
    lse = lse.reshape(B, hkv, g, nb * bq)[:, :, :, :nq]
    return out, lse


class _NativeBand(torch.autograd.Function):
    """The fused compiled band kernel (:mod:`.native`) on one chunk: queries
    ``(B, Hkv, G, nq, D)`` and the keys/values their band reaches; backward is the compiled
    band backward, which recomputes the probabilities from the saved log-sum-exp. Inputs are the
    chunk's slices, so gradients stay chunk-sized (the slicing's own backward places them)."""

    @staticmethod
    def forward(c, qs, k, v, comp: Ranges, ctx: Ctx, weights=None):
        lo, hi = comp.band
        c.q_scale = 1.0 if ctx is None else ctx.q_scale
        out, lse = native.band_forward(qs, k, v, lo, hi, 0, qs.shape[3], weights=weights,
                                       scale=c.q_scale)
        c.save_for_backward(qs, k, v, lse)
        c.band = (lo, hi)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(c, g_out, g_lse):
        if c.q_scale != 1.0:  # scale_in_kernel is for calls without autograd
            raise RuntimeError("the band kernel's in-kernel query scale has no backward")
        qs, k, v, lse = c.saved_tensors
        grads = native.band_backward(qs, k, v, g_out, lse, g_lse, *c.band)
        return (*grads, None, None, None)


def _native_band_ok(comp: Ranges, qs, k, v, ctx: Ctx, training: bool) -> bool:
    return (not comp.masks and not (ctx.dropout_p > 0 and training)
            and comp.band[1] - comp.band[0] + 1 <= native.BAND_MAX_WIDTH
            and qs.shape[-1] > 0 and v.shape[-1] > 0
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (qs, k, v))
            and native.band_available())


def scale_in_kernel(comps: list[Component], qs: Tensor, k: Tensor, v: Tensor,
                    ctx: Ctx) -> bool:
    """Whether the plan ``comps`` (lowered) is one band that the compiled kernel runs with no
    autograd, bias or ``score_mod``, so that it can take the queries unscaled with their
    factor in ``ctx.q_scale`` (the kernel scales each query block as it packs it: no scaled
    copy of the queries, one full pass over them and its fresh memory fewer). Its weights, if
    asked for, are the forward's probabilities (or the compiled weights pass, given the same
    factor)."""
    c = comps[0] if len(comps) == 1 else None
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qs, k, v))
    return (isinstance(c, Ranges) and c.band is not None and not grad
            and ctx.bias is None and ctx.score_mod is None
            and _native_band_ok(c, qs, k, v, ctx, training=True))


def _band_fast_partial(comp: Ranges, qs, k, v, q0, q1, ctx: Ctx, training: bool):
    """Band kernel without bias or score_mod: the fused compiled kernel when it applies (no
    extra masks, no dropout, fp32 on CPU), else :func:`_band_torch_partial`."""
    compiled = _native_band_ok(comp, qs, k, v, ctx, training)
    if ctx.q_scale != 1.0 and not compiled:
        raise RuntimeError("unscaled queries reached a kernel other than the compiled band's")
    if compiled:
        # the chunk's rows and the keys their band reaches, as a sub-problem of its own
        lo, hi = comp.band
        delta = ctx.lk - ctx.lq
        a, z = max(0, q0 + delta + lo), min(ctx.lk, q1 + delta + hi)
        sink = ctx.weights_sink
        # (a union's band writes weights only with the others' log-sum-exp of its rows; without
        # it, they are written afterwards from the row's)
        sink = sink if (sink is not None and sink.comp is comp
                        and (sink.other_lse is not None or not sink.others)) else None
        if z <= a:  # no key for any row of the chunk
            if sink is not None:
                sink.rows += q1 - q0  # no weight to write
            return _no_keys(qs, q1 - q0, v.shape[-1])
        sub_lq, sub_lk = q1 - q0, z - a
        shift = q0 + delta - a - (sub_lk - sub_lq)  # keeps j - i - (Lk - Lq) in [lo, hi]
        sub = replace(comp, band=(lo + shift, hi + shift))
        w = None if sink is None else (sink.values, sink.offsets[q0:q1], sink.indices, a,
                                       sink.other_lse)
        out, lse = _NativeBand.apply(qs[:, :, :, q0:q1], k[:, :, a:z], v[:, :, a:z], sub,
                                     replace(ctx, lq=sub_lq, lk=sub_lk), w)
        if sink is not None:
            sink.rows += q1 - q0
        return out, (lse if ctx.need_lse else None)
    return _band_torch_partial(comp, qs, k, v, q0, q1, ctx, training)


class _BandWindows:
    """The window layout of a band component on queries ``[q0, q1)``: block ``b`` (``bq``
    rows) reads the ``width = bq + hi - lo`` keys from ``s0 + b * bq`` on, so the windows of a
    zero-padded key slice are overlapping views at a fixed stride (``unfold``, no gather).
    ``qi (nb, bq, 1)``, ``kj (nb, 1, C)`` (clamped into range) and ``ok (nb, bq, C)`` are its
    candidates, masks applied; row ``r`` of a block sees window slots ``r .. r + hi - lo``."""

    def __init__(self, comp: Ranges, q0: int, q1: int, ctx: Ctx, device):
        bq = ctx.block
        self.nb = nb = -(-(q1 - q0) // bq)
        lo, hi = comp.band
        self.width = width = bq + hi - lo  # window of a block: every row's band
        # Key window of block b starts at q0 + b*bq + delta + lo; pad keys so all windows
        # exist.
        s0 = q0 + (ctx.lk - ctx.lq) + lo
        span = (nb - 1) * bq + width
        self.a, self.z = max(s0, 0), min(s0 + span, ctx.lk)
        self.left = self.a - s0
        self.right = span - self.left - max(self.z - self.a, 0)
        offs = torch.arange(width, device=device)
        rows = torch.arange(bq, device=device)
        rel = offs.view(1, 1, -1) - rows.view(1, -1, 1)  # key slot - row = offset - lo
        keyidx = s0 + torch.arange(nb, device=device).view(-1, 1, 1) * bq + offs.view(1, 1, -1)
        qidx = q0 + torch.arange(nb, device=device).view(-1, 1, 1) * bq + rows.view(1, -1, 1)
        # combined small (row, slot), (block, slot) and (block, row) masks first: two passes
        # over the (nb, bq, C) layout instead of four
        ok = ((rel >= 0) & (rel <= hi - lo)) & ((keyidx >= 0) & (keyidx < ctx.lk)) & (qidx < q1)
        self.qi = qidx.clamp(max=max(ctx.lq - 1, 0))
        self.kj = keyidx.clamp(0, max(ctx.lk - 1, 0))
        self.ok = comp._apply_masks(self.qi, self.kj, ok, ctx.lq, ctx.lk)

    def pad(self, x: Tensor) -> Tensor:
        """``x (B, H, Lk, D)`` cut to the windows' span and zero-padded at both ends."""
        return F.pad(x[:, :, self.a:max(self.z, self.a)], (0, 0, self.left, self.right))


def _band_scores(comp: Ranges, qs, k, q0, q1, ctx: Ctx, masked: bool = True,
                 minus: Tensor | None = None):
    """Finished scores ``(B, Hkv, G, nb, bq, C)`` of a band on queries ``[q0, q1)`` in the
    window layout of :class:`_BandWindows` (one GEMM per (batch, kv-head) on strided views of
    the keys), with ``qi``, ``kj``, ``valid``. ``minus (B, Hkv, G, Lq)`` (only without bias
    and ``score_mod``) is subtracted from each row inside the GEMM: ``[q, -m] . [k, 1]``."""
    B, hkv, g, _, d = qs.shape
    bq = ctx.block
    win = _BandWindows(comp, q0, q1, ctx, qs.device)
    nb, width = win.nb, win.width
    qc = qs[:, :, :, q0:q1]
    kp = win.pad(k)  # the chunk's key span only
    if minus is not None:
        kp = torch.cat([kp, kp.new_ones(*kp.shape[:-1], 1)], -1)
        qc = torch.cat([qc, -minus[:, :, :, q0:q1].unsqueeze(-1).to(qc.dtype)], -1)
        d += 1
    if nb * bq > q1 - q0:
        qc = F.pad(qc, (0, 0, 0, nb * bq - (q1 - q0)))
    qc = qc.reshape(B, hkv, g, nb, bq, d).transpose(2, 3).reshape(B, hkv, nb, g * bq, d)
    if torch.is_grad_enabled() and (qc.requires_grad or kp.requires_grad):
        s = torch.stack([torch.stack([torch.bmm(qc[b, h], kp[b, h].unfold(0, width, bq))
                                      for h in range(hkv)]) for b in range(B)])
    else:  # straight into one buffer (out= has no autograd)
        s = qc.new_empty(B, hkv, nb, g * bq, width)
        for b in range(B):
            for h in range(hkv):
                torch.bmm(qc[b, h], kp[b, h].unfold(0, width, bq), out=s[b, h])
    s = s.to(_compute_dtype(qs)).view(B, hkv, nb, g, bq, width).transpose(2, 3)
    return (finish_scores(s, win.qi, win.kj, win.ok if masked else None, ctx), win.qi, win.kj,
            win.ok)


def _band_torch_partial(comp: Ranges, qs, k, v, q0, q1, ctx: Ctx, training: bool):
    """Band kernel without bias or score_mod: keys are viewed as overlapping windows
    (``unfold``, no gather), the mask is fused into the score GEMM (``baddbmm``) and the softmax
    is torch's fused one. One GEMM pair per (batch, kv-head)."""
    B, hkv, g, _, d = qs.shape
    dv = v.shape[-1]
    bq = ctx.block
    nq = q1 - q0
    win = _BandWindows(comp, q0, q1, ctx, qs.device)
    nb, width, ok = win.nb, win.width, win.ok
    pad = nb * bq - nq
    kp, vp = win.pad(k), win.pad(v)
    empty = ~ok.any(-1)  # (nb, bq)
    dtype = _compute_dtype(qs)
    # filled with -inf after the score GEMM, not added to it: a NaN score of a key outside a
    # row's band (a NaN key) must not reach that row (NaN + -inf is NaN), as in the dense
    # reference. Empty rows stay finite here and are zeroed later.
    drop = ~(ok | empty.unsqueeze(-1))
    if g > 1:
        drop = drop.repeat(1, g, 1)
        empty_g = empty.repeat(1, g)
    else:
        empty_g = empty
    any_empty = bool(empty.any())
    qc = qs[:, :, :, q0:q1]
    if pad:
        qc = F.pad(qc, (0, 0, 0, pad))
    qc = qc.reshape(B, hkv, g, nb, bq, d).transpose(2, 3).reshape(B, hkv, nb, g * bq, d)
    outs, lses = [], []
    sink = ctx.weights_sink
    if sink is not None and sink.comp is comp and sink.counts is not None:
        # the weights of this chunk's allowed pairs, CSR order = the window layout's row-major
        # order (each row's keys ascend): appended as each head's probabilities are computed
        pick = ok.reshape(-1).nonzero().squeeze(1)
        per_block = ok.shape[1] * width  # pick -> (block, slot): the key of that window slot
        n0, cnt = sink.append(win.kj.reshape(-1), (pick // per_block) * width + pick % width,
                              ok.sum(-1).reshape(-1)[:nq], q0)
    else:
        sink = None
    for b in range(B):
        for h in range(hkv):
            kw_t = kp[b, h].unfold(0, width, bq)  # (nb, d, C): windows, transposed, a view
            vw = vp[b, h].unfold(0, width, bq).transpose(1, 2)  # (nb, C, dv)
            sc = torch.bmm(qc[b, h], kw_t)
            if sc.dtype != dtype:
                sc = sc.to(dtype)
            sc = sc.masked_fill_(drop, NEG_INF)
            p = torch.softmax(sc, -1)
            if ctx.need_lse:
                # lse = max - log(p[argmax]); p[argmax] >= 1/C, so this never underflows.
                mval, idx = sc.max(-1, keepdim=True)
                lse = (mval - torch.log(p.gather(-1, idx))).squeeze(-1)
                if any_empty:
                    lse = lse.masked_fill(empty_g, NEG_INF)
                lses.append(lse)
            if any_empty:
                p = p.masked_fill(empty_g.unsqueeze(-1), 0.0)
            if ctx.dropout_p > 0 and training:
                p = F.dropout(p, ctx.dropout_p, training=True)
            if sink is not None:
                p4 = p.view(nb, g, bq, width)
                for gi in range(g):
                    torch.index_select(p4[:, gi].reshape(-1), 0, pick,
                                       out=sink.values[(b * hkv + h) * g + gi, n0:n0 + cnt])
            outs.append(torch.bmm(p.to(v.dtype), vw))
    out = torch.stack(outs).view(B, hkv, nb, g, bq, dv).transpose(2, 3)
    out = out.reshape(B, hkv, g, nb * bq, dv)[:, :, :, :nq]
    if ctx.need_lse:
        lse = torch.stack(lses).view(B, hkv, nb, g, bq).transpose(2, 3)
        lse = lse.reshape(B, hkv, g, nb * bq)[:, :, :, :nq]
    else:
        lse = None
    return out, lse


def _offset_scores(comp: Offsets, qs, k, q0, q1, ctx: Ctx):
    """Finished scores ``(B, Hkv, G, nq, n)`` of an offsets component (one row-wise dot product
    per offset on a shifted slice of ``k``, read in place), with ``qi (nq, 1)``,
    ``kj (nq, n)``, ``valid (nq, n)`` and per offset the query rows ``(a, b)`` (relative to
    ``q0``) whose key is in range."""
    B, hkv, g, _, d = qs.shape
    qi, kj, valid = comp.candidates(q0, q1, ctx.lq, ctx.lk, qs.device)
    nq = kj.shape[0]
    delta = ctx.lk - ctx.lq
    dtype = _compute_dtype(qs)
    qc = qs[:, :, :, q0:q1]
    if qc.dtype != dtype:  # half precision: products and sums in fp32, as matmul would
        qc, k = qc.to(dtype), k.to(dtype)
    spans = []  # (a, b): the query rows [a, b) (relative to q0) whose key is in range
    cols = []
    for o in comp.offsets:
        a = min(max(0, -(q0 + delta + o)), nq)
        b = max(min(nq, ctx.lk - (q0 + delta + o)), a)
        spans.append((a, b))
        if b > a:
            j0 = q0 + a + delta + o
            col = torch.linalg.vecdot(qc[:, :, :, a:b], k[:, :, None, j0:j0 + b - a])
        else:
            col = qc.new_zeros(B, hkv, g, 0)
        cols.append(F.pad(col, (a, nq - b)) if (a, b) != (0, nq) else col)
    s = torch.stack(cols, -1)  # (B, hkv, g, nq, n); out-of-range entries are masked next
    return finish_scores(s, qi, kj, valid, ctx), qi, kj, valid, spans


def _offsets_partial(comp: Offsets, qs, k, v, q0, q1, ctx: Ctx, training: bool):
    """Kernel for a short list of relative offsets (dilated, exponential).

    For one offset ``o`` the keys of queries ``i`` are the rows ``i + delta + o``: a shifted
    slice of ``k`` (and of ``v``), read in place. Each offset is one row-wise dot product for
    its score column and one ``addcmul_`` into the output, so nothing of size
    ``rows x offsets x d`` is gathered (a gather of far-apart rows was ~2/3 of the time of
    ``window | exponential`` at 16k tokens)."""
    B, hkv, g, _, _ = qs.shape
    dv = v.shape[-1]
    s, qi, kj, valid, spans = _offset_scores(comp, qs, k, q0, q1, ctx)
    capture_scores(comp, s, qi, kj, valid, ctx)
    nq = kj.shape[0]
    delta = ctx.lk - ctx.lq
    p, lse = softmax_rows(s, ctx, training)
    sink = ctx.weights_sink
    if sink is not None and sink.comp is comp and not p.requires_grad:
        # the chunk's allowed pairs in row-major order of (row, offset) are in CSR order
        # (offsets ascend): appended to the weights (no dropout: see weights_sink)
        pick = valid.reshape(-1).nonzero().squeeze(1)
        n0, cnt = sink.append(kj.reshape(-1), pick, valid.sum(-1), q0)
        torch.gather(p.reshape(B * hkv * g, -1), 1, pick.expand(B * hkv * g, -1),
                     out=sink.values[:, n0:n0 + cnt])
    p = p.to(v.dtype)
    out = v.new_zeros(B, hkv, g, nq, dv)
    for c, (o, (a, b)) in enumerate(zip(comp.offsets, spans)):
        if b > a:
            j0 = q0 + a + delta + o
            out[:, :, :, a:b].addcmul_(p[:, :, :, a:b, c:c + 1], v[:, :, None, j0:j0 + b - a])
    return out, lse


def _key_scores(qc, kc, qi, kj, valid, ctx: Ctx) -> Tensor:
    """Finished scores ``(B, hkv, g, nr, nk)`` of query rows ``qc (B,hkv,g,nr,d)`` on the
    keys ``kc (B,hkv,nk,d)``."""
    B, hkv, g, nr, d = qc.shape
    s = torch.matmul(qc.reshape(B, hkv, g * nr, d), kc.transpose(-1, -2))
    s = s.to(_compute_dtype(qc)).view(B, hkv, g, nr, kc.shape[2])
    return finish_scores(s, qi, kj, valid, ctx)


def _keys_partial(qc, kc, vc, qi, kj, valid, ctx: Ctx, training: bool, comp):
    """Dense attention of query rows ``qc (B,hkv,g,nr,d)`` on a shared key set (``comp``: the
    component, for :func:`capture_scores`)."""
    B, hkv, g, nr, d = qc.shape
    s = _key_scores(qc, kc, qi, kj, valid, ctx)
    capture_scores(comp, s, qi, kj, valid, ctx)
    p, lse = softmax_rows(s, ctx, training)
    out = torch.matmul(p.to(vc.dtype).reshape(B, hkv, g * nr, kc.shape[2]), vc)
    return out.view(B, hkv, g, nr, -1), lse


def _keyset_partial(comp: KeySet | AllKeys, qs, k, v, q0, q1, ctx: Ctx, training: bool):
    qi, kj, valid = comp.candidates(q0, q1, ctx.lq, ctx.lk, qs.device)
    if isinstance(comp, AllKeys):
        kc, vc = k, v
    else:
        kc, vc = k.index_select(2, kj[0]), v.index_select(2, kj[0])
    return _keys_partial(qs[:, :, :, q0:q1], kc, vc, qi, kj, valid, ctx, training, comp)


def _rowset_rows(comp: RowSet, qs, k, v, ctx: Ctx, training: bool, grad: bool):
    """A row set over all of its rows at once: ``(rows, out (B, Hkv, G, nr, Dv), lse)``. Its
    rows see every key, so each group of rows (scores within :data:`CHUNK_ELEMENTS`) streams
    ``k`` and ``v`` once; chunked with the other components by query rows, each chunk's one or
    two rows would stream them again. With autograd, groups are recomputed in backward once
    there is more than one (as chunks are)."""
    rows = comp.rows.to(qs.device)
    per = max(1, CHUNK_ELEMENTS // max(1, ctx.batch * ctx.hq * ctx.lk))
    outs, lses = [], []
    for r0 in range(0, rows.numel(), per):
        r = rows[r0:r0 + per]
        qi, kj, valid = comp.candidates_for(r, 0, ctx.lk, ctx.lq, ctx.lk)
        if grad and rows.numel() > per:
            o, l = checkpoint(_keys_partial, qs.index_select(3, r), k, v, qi, kj, valid, ctx,
                              training, comp, use_reentrant=False)
        else:
            o, l = _keys_partial(qs.index_select(3, r), k, v, qi, kj, valid, ctx, training, comp)
        outs.append(o)
        lses.append(l)
    return rows, torch.cat(outs, 3), torch.cat(lses, 3)


def _with_row_sets(qs, k, v, comps: list[Component], ctx: Ctx, training: bool, grad: bool):
    """:func:`structured_attention` of a plan with row sets (their kernel): each row set once
    over all its rows (:func:`_rowset_rows`), the other components as usual, their rows
    merged."""
    found = [_rowset_rows(c, qs, k, v, ctx, training, grad) for c in comps
             if isinstance(c, RowSet) and c.rows.numel()]
    sink = ctx.weights_sink
    if sink is not None and sink.others:  # for the band's weights (see _chunk)
        B, hkv, g, lq, _ = qs.shape
        sink.rows_lse = qs.new_full((B, hkv, g, lq), NEG_INF)
        for rows, _, l_r in found:
            sink.rows_lse[:, :, :, rows] = torch.logaddexp(sink.rows_lse[:, :, :, rows], l_r)
        sink.row_pairs, sink.pending = _merged_pairs(sink.pending), []
    out, lse = structured_attention(qs, k, v, [c for c in comps if not isinstance(c, RowSet)],
                                    ctx, training)
    for rows, o_r, l_r in found:
        o_m, l_m = merge([(out.index_select(3, rows), lse.index_select(3, rows)),
                          (o_r.to(out.dtype), l_r)])
        if grad:
            out, lse = out.index_copy(3, rows, o_m), lse.index_copy(3, rows, l_m)
        else:  # fresh buffers of this call
            out.index_copy_(3, rows, o_m)
            lse.index_copy_(3, rows, l_m)
    return out, lse


def _edge_scores(comp: Edges, qs, k, q0, q1, ctx: Ctx):
    """Finished scores ``(B, hkv, g, ne)`` of an edge component's pairs for queries
    ``[q0, q1)`` (sampled products, or per-pair gathers for a few features or dtypes the CSR
    kernels lack), with ``qi``, ``kj``, ``valid`` ``(ne,)`` and the chunk's CSR structure."""
    B, hkv, g, _, _ = qs.shape
    nq = q1 - q0
    qi, kj, valid = comp.candidates(q0, q1, ctx.lq, ctx.lk, qs.device)
    local = qi - q0
    indptr = comp.indptr.to(qs.device)
    st = csr.CSRStructure(indptr[q0:q1 + 1] - indptr[q0], kj, nq, ctx.lk)
    if qs.shape[-1] <= 4 or not all(csr.supports(t) and t.dtype == qs.dtype for t in (qs, k)):
        # a few features per pair (e.g. GAT's [a_dst, 1] . [1, a_src]): gathering them is
        # cheaper than a sampled product per head
        B_, d = qs.shape[0], qs.shape[-1]
        # row layout: gathers (and their index_add backward) run along dim 0, the fast way
        q_rows = qs[:, :, :, q0:q1].permute(3, 0, 1, 2, 4).reshape(nq, -1)
        k_rows = k.permute(2, 0, 1, 3).reshape(ctx.lk, -1)
        qe = q_rows.index_select(0, local).view(-1, B_, hkv, g, d)
        ke = k_rows.index_select(0, kj).view(-1, B_, hkv, 1, d)
        s = (qe * ke).sum(-1).permute(1, 2, 3, 0).to(_compute_dtype(qs))  # (B, hkv, g, ne)
    else:
        s = csr.sddmm(qs[:, :, :, q0:q1], k, st).to(_compute_dtype(qs))  # (B, hkv, g, ne)
    s = finish_scores(s.unsqueeze(-1), qi.unsqueeze(-1), kj.unsqueeze(-1), valid.unsqueeze(-1),
                      ctx).squeeze(-1)
    return s, qi, kj, valid, st


def uses_sparse_mm(qs: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether edge components run on the CSR kernels (:func:`_edges_csr_partial`): inputs of
    one dtype the sparse products support."""
    return all(csr.supports(t) and t.dtype == qs.dtype for t in (qs, k, v))


def _edges_csr_partial(comp: Edges, qs, k, v, q0, q1, ctx: Ctx, training: bool):
    """Edge kernel on sparse-matrix products: scores by SDDMM, the weighted sum by SpMM (see
    :mod:`.csr`); only ``(B, Hq, nnz)`` scalars per chunk are materialized, never a per-edge
    copy of the key or value rows."""
    B, hkv, g, _, _ = qs.shape
    nq = q1 - q0
    s, qi, _, _, st = _edge_scores(comp, qs, k, q0, q1, ctx)
    local = qi - q0
    # segment softmax on 2-D (rows, ne) views: torch's index ops are fastest there
    rows = B * hkv * g
    s2 = s.reshape(rows, -1)
    m = torch.full((rows, nq), NEG_INF, dtype=s.dtype, device=s.device)
    m = m.scatter_reduce(1, local.expand_as(s2), s2.detach(), reduce="amax", include_self=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s2 - m.index_select(1, local))  # unnormalized, (rows, ne)
    lsum = torch.zeros_like(m).index_add(1, local, p)
    nonempty = lsum > 0
    lsum_safe = torch.where(nonempty, lsum, torch.ones_like(lsum))
    sink = ctx.weights_sink
    if sink is not None and sink.comp is comp and not p.requires_grad:
        # the edge list is the weights' CSR layout: this chunk's probabilities go straight to
        # their slots (no dropout: see weights_sink; a score_mod whose parameters need
        # gradients leaves them to pair_weights)
        e0 = int(comp.indptr[q0])
        p = torch.div(p, lsum_safe.index_select(1, local),
                      out=sink.values[:, e0:e0 + p.shape[1]])
        sink.rows += nq
    else:
        p = p / lsum_safe.index_select(1, local)
    if ctx.dropout_p > 0 and training:
        p = F.dropout(p, ctx.dropout_p, training=True)
    out = csr.spmm(p.to(v.dtype).view(B, hkv, g, -1), v, st)
    lse = torch.where(nonempty, m + torch.log(lsum_safe), torch.full_like(m, NEG_INF))
    return out, lse.view(B, hkv, g, nq)


def _edges_partial(comp: Edges, qs, k, v, q0, q1, ctx: Ctx, training: bool):
    """Edge-wise kernel with a segment softmax over each query's explicit key list.

    Works in a row layout ``(B, L, heads, d)``: each edge gathers one contiguous row of all
    heads (instead of one short row per head), and the output is normalized per query rather
    than per edge.
    """
    B, hkv, g, _, _ = qs.shape
    dv = v.shape[-1]
    nq = q1 - q0
    qi, kj, valid = comp.candidates(q0, q1, ctx.lq, ctx.lk, qs.device)
    local = qi - q0
    k_rows, v_rows = ctx.rows(k, v)  # (B, Lk, hkv, d), (B, Lk, hkv, dv)
    q_rows = qs[:, :, :, q0:q1].permute(0, 3, 1, 2, 4)  # (B, nq, hkv, g, d)
    d = qs.shape[-1]
    qe = q_rows.reshape(B, nq, hkv * g * d).index_select(1, local).view(B, -1, hkv, g, d)
    ke = k_rows.index_select(1, kj)  # (B, ne, hkv, d)
    s = (qe * ke.unsqueeze(3)).sum(-1).to(_compute_dtype(qs))  # (B, ne, hkv, g)
    s_view = s.permute(0, 2, 3, 1)  # (B, hkv, g, ne): the layout finish_scores expects
    s_view = finish_scores(s_view.unsqueeze(-1), qi.unsqueeze(-1), kj.unsqueeze(-1),
                           valid.unsqueeze(-1), ctx).squeeze(-1)
    s = s_view.permute(0, 3, 1, 2)  # (B, ne, hkv, g)
    idx = local.view(1, -1, 1, 1).expand_as(s)
    m = torch.full((B, nq, hkv, g), NEG_INF, dtype=s.dtype, device=s.device)
    m = m.scatter_reduce(1, idx, s.detach(), reduce="amax", include_self=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m.index_select(1, local))  # unnormalized, (B, ne, hkv, g)
    lsum = torch.zeros_like(m).index_add(1, local, p)
    nonempty = lsum > 0
    lsum_safe = torch.where(nonempty, lsum, torch.ones_like(lsum))
    if ctx.dropout_p > 0 and training:
        p = F.dropout(p, ctx.dropout_p, training=True)
    ve = v_rows.index_select(1, kj)  # (B, ne, hkv, dv)
    contrib = (p.unsqueeze(-1) * ve.unsqueeze(3)).to(qs.dtype)  # (B, ne, hkv, g, dv)
    width = hkv * g * dv
    acc = qs.new_zeros(B, nq, width).index_add(1, local, contrib.reshape(B, -1, width))
    out = acc.view(B, nq, hkv, g, dv) / lsum_safe.unsqueeze(-1).to(qs.dtype)
    lse = torch.where(nonempty, m + torch.log(lsum_safe), torch.full_like(m, NEG_INF))
    return out.permute(0, 2, 3, 1, 4), lse.permute(0, 2, 3, 1)


def component_width(comp: Component, ctx: Ctx, d: int) -> float:
    """Elements of a component's largest intermediate per query row (all heads, one batch
    item), for chunk sizing."""
    lq, lk = ctx.lq, ctx.lk
    if isinstance(comp, Ranges):
        avg = comp.cost(lq, lk) / max(lq, 1)
        return (avg + ctx.block) * max(1.0, d / ctx.block) * ctx.hq
    if isinstance(comp, Offsets):
        return len(comp.offsets) * (d + ctx.groups) * ctx.hkv
    if isinstance(comp, KeySet):
        return comp.keys.numel() * ctx.hq
    if isinstance(comp, AllKeys):
        return lk * ctx.hq
    if isinstance(comp, Edges):
        per_edge = 2 if ctx.sparse_mm else (d + 1) * 2  # CSR path: a few scalars per edge
        return comp.cost(lq, lk) / max(lq, 1) * per_edge * ctx.hq
    return ctx.hq  # RowSet: its own few rows, sized separately


def chunk_rows(comps: list[Component], ctx: Ctx, d: int, budget: int | None = None) -> int:
    """Query rows per chunk so that one chunk's intermediates over all of ``comps`` stay within
    ``budget`` elements (default :data:`CHUNK_ELEMENTS`): a multiple of ``ctx.block``, at least
    one block (not capped at ``ctx.lq``). The kernels, the weights and the sequence-parallel
    code all chunk by it."""
    budget = CHUNK_ELEMENTS if budget is None else budget
    width = sum(component_width(c, ctx, d) for c in comps) * ctx.batch
    return max(ctx.block, int(budget // max(width, 1)) // ctx.block * ctx.block)


def component_scores(comp: Component, qs: Tensor, k: Tensor, q0: int, q1: int, ctx: Ctx,
                     masked: bool = True, minus: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Finished scores (bias, ``score_mod``, masks: ``-inf`` off the allowed pairs) of one
    (lowered) component's candidates for queries ``[q0, q1)``, computed as its kernel computes
    them: ``(s (B, Hkv, G, *S), qi, kj, valid)`` with ``qi``, ``kj`` broadcasting to ``S`` and
    ``valid`` of shape ``S``. The allowed pairs, ``valid``'s entries in row-major order, are
    sorted by query then key (as :func:`.enumerate.allowed_pairs` lists them). None when no
    candidate exists. ``masked=False`` may leave scores off ``valid`` unmasked (for callers
    that only read ``valid``'s entries). ``minus (B, Hkv, G, Lq)``, e.g. the rows'
    log-sum-exp, is subtracted from each row's scores (folded into the band GEMM when no bias
    or ``score_mod`` comes between)."""
    if isinstance(comp, Ranges) and comp.band is not None and q1 > q0:
        if (minus is not None and ctx.bias is None and ctx.score_mod is None
                and qs.dtype in (torch.float32, torch.float64)):  # lse kept exact
            return _band_scores(comp, qs, k, q0, q1, ctx, masked, minus)
        res = _band_scores(comp, qs, k, q0, q1, ctx, masked)
    elif isinstance(comp, Ranges):
        res = _range_scores(comp, qs, k, q0, q1, ctx)
    elif isinstance(comp, Offsets):
        res = _offset_scores(comp, qs, k, q0, q1, ctx)[:4]
    elif isinstance(comp, Edges):
        res = _edge_scores(comp, qs, k, q0, q1, ctx)[:4]
    elif isinstance(comp, RowSet):
        rows = comp.rows_in(q0, q1, qs.device)
        if rows.numel() == 0:
            return None
        qi, kj, valid = comp.candidates_for(rows, 0, ctx.lk, ctx.lq, ctx.lk)
        res = _key_scores(qs.index_select(3, rows), k, qi, kj, valid, ctx), qi, kj, valid
    elif isinstance(comp, (KeySet, AllKeys)):
        qi, kj, valid = comp.candidates(q0, q1, ctx.lq, ctx.lk, qs.device)
        kc = k if isinstance(comp, AllKeys) else k.index_select(2, kj[0])
        res = _key_scores(qs[:, :, :, q0:q1], kc, qi, kj, valid, ctx), qi, kj, valid
    else:
        raise TypeError(f"no scores for component {type(comp).__name__} (lower() it first)")
    if res is None or minus is None:
        return res
    s, qi, kj, valid = res
    B, hkv, g = s.shape[:3]
    row = minus.index_select(3, qi.reshape(-1)).view(B, hkv, g, *qi.shape)
    return s - row, qi, kj, valid


_KERNELS = {
    Ranges: _ranges_partial,
    Offsets: _offsets_partial,
    KeySet: _keyset_partial,
    AllKeys: _keyset_partial,
    Edges: _edges_partial,
}


def lower(comps: list[Component], lq: int, lk: int) -> list[Component]:
    """Turn bands into ranges (the kernels' form)."""
    out = []
    for c in comps:
        if isinstance(c, Band):
            start, stop = band_ranges(c.lo, c.hi, lq, lk)
            out.append(Ranges(start, stop, band=(c.lo, c.hi), masks=c.masks))
        else:
            out.append(c)
    return out


def _kernel_for(comp: Component, ctx: Ctx):
    if (isinstance(comp, Ranges) and comp.band is not None and ctx.bias is None
            and ctx.score_mod is None):
        return _band_fast_partial
    if isinstance(comp, Edges) and ctx.sparse_mm:
        return _edges_csr_partial
    return _KERNELS[type(comp)]


def _chunk(qs, k, v, comps, ctx, q0, q1, training):
    sink = ctx.weights_sink
    band = None if sink is None or not sink.others else next(
        (c for c in comps if c is sink.comp), None)
    others = [c for c in comps if c is not band]
    parts = [_kernel_for(c, ctx)(c, qs, k, v, q0, q1, ctx, training) for c in others]
    if band is None:
        return merge(parts)
    # A union whose band writes its weights: the other components ran first, so their pairs
    # are placed now and the band kernel normalizes its runs by the whole row (their
    # log-sum-exp folded in): no pass over all the weights afterwards, nothing listed up front.
    placed = _place_chunk(sink, qs, k, others, q0, q1, ctx)
    lses = [lse for _, lse in parts]
    if sink.rows_lse is not None:
        lses.append(sink.rows_lse[:, :, :, q0:q1])
    sink.other_lse = (functools.reduce(torch.logaddexp, lses).to(qs.dtype).contiguous() if lses
                      else torch.full_like(qs[:, :, :, q0:q1, 0], NEG_INF))
    parts.append(_kernel_for(band, ctx)(band, qs, k, v, q0, q1, ctx, training))
    sink.other_lse = None
    out, lse = merge(parts)
    whole = (lse if sink.rows_lse is None  # the row sets' mass joins after the chunks
             else torch.logaddexp(lse, sink.rows_lse[:, :, :, q0:q1]))
    for pos, local, scores in placed:
        # gather, not index_select: along the last dim it is several times faster on CPU
        row = torch.gather(whole.reshape(scores.shape[0], -1), 1,
                           local.expand(scores.shape[0], -1))
        w = (scores - row).exp_().masked_fill_(torch.isneginf(row), 0.0)  # no mass: weight 0
        sink.values.index_copy_(1, pos, w.to(sink.values.dtype))
    return out, lse


def structured_attention(
    qs: Tensor, k: Tensor, v: Tensor, comps: list[Component], ctx: Ctx, training: bool = True
) -> tuple[Tensor, Tensor]:
    """Attention over the union of disjoint components.

    Args:
        qs: pre-scaled queries ``(B, Hkv, G, Lq, D)``.
        k: keys ``(B, Hkv, Lk, D)``; v: values ``(B, Hkv, Lk, Dv)``.
    Returns:
        ``out (B, Hkv, G, Lq, Dv)`` and ``lse (B, Hkv, G, Lq)``.
    """
    B, hkv, g, lq, d = qs.shape
    if not comps or lq == 0:
        return _no_keys(qs, lq, v.shape[-1])
    ctx.sparse_mm = uses_sparse_mm(qs, k, v)
    rows = min(chunk_rows(comps, ctx, d), lq)
    ctx.need_lse = ctx.need_lse or len(comps) > 1
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (qs, k, v) + ((ctx.bias,) if ctx.bias is not None else ())
    )
    if any(isinstance(c, RowSet) for c in comps):
        return _with_row_sets(qs, k, v, comps, ctx, training, grad)
    whole = [c for c in comps if (grad or len(comps) == 1)
             and _kernel_for(c, ctx) is _band_fast_partial
             and _native_band_ok(c, qs, k, v, ctx, training)]
    if whole:
        # A compiled band runs over all rows at once: it keeps nothing of size rows x window
        # (its buffers are per thread; its backward recomputes from the lse), so chunks would
        # only cost. Alone without autograd, each chunk's output would be copied into the
        # whole's (64k tokens: ~15% of the forward); with autograd, the backward of each
        # chunk's slices of q, k, v is a zero-filled gradient of their full size, summed over
        # the chunks (64k tokens, 18 chunks: ~3/4 of the backward's time). The other
        # components are chunked on their own (few rows or keys: few chunks).
        rest = [c for c in comps if not any(c is w for w in whole)]
        parts = [_band_fast_partial(c, qs, k, v, 0, lq, ctx, training) for c in whole]
        if rest:
            parts.append(structured_attention(qs, k, v, rest, ctx, training))
        return merge(parts)
    n_chunks = math.ceil(lq / rows)
    # Recompute chunks in backward (FlashAttention-style) once keeping every chunk's
    # intermediates would cost more memory than a couple of chunks.
    use_ckpt = grad and n_chunks > 2
    if not grad and n_chunks > 1:
        # no autograd: each chunk's result goes straight into its rows of the output, so
        # the chunks' results and their concatenation never coexist
        out = lse = None
        for q0 in range(0, lq, rows):
            q1 = min(lq, q0 + rows)
            o, l = _chunk(qs, k, v, comps, ctx, q0, q1, training)
            if out is None:
                out = o.new_empty(*o.shape[:3], lq, o.shape[4])
                lse = None if l is None else l.new_empty(*l.shape[:3], lq)
            out[:, :, :, q0:q1] = o
            if lse is not None:
                lse[:, :, :, q0:q1] = l
        return out, lse
    outs, lses = [], []
    for q0 in range(0, lq, rows):
        q1 = min(lq, q0 + rows)
        if use_ckpt:
            o, l = checkpoint(
                _chunk, qs, k, v, comps, ctx, q0, q1, training, use_reentrant=False
            )
        else:
            o, l = _chunk(qs, k, v, comps, ctx, q0, q1, training)
        outs.append(o)
        lses.append(l)
    lse = None if lses[0] is None else (lses[0] if len(lses) == 1 else torch.cat(lses, 3))
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 3)), lse
