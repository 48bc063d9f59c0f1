"""Sequence-parallel sparse attention on ``torch.distributed``.

Each rank holds a contiguous shard ``[start, stop)`` of one long sequence (its queries, keys and
values, ``(B, H, L_local, D)``) and computes *exact* attention for its own queries under a banded
pattern (``sliding_window``, ``dilated``, ``exponential``, ``causal``, their unions and
intersections) plus ``global_tokens``:

- **Band halo, point-to-point.** A banded pattern is translation invariant: it allows a set of
  offsets ``O`` (``j - i``). The keys the local queries need for offset ``o`` are the local block
  shifted by ``o`` — a contiguous block owned by at most two ranks — so a rank needs the union of
  ``[start + o, stop + o)`` over ``o`` in ``O``, clipped to the sequence: a halo of ``w`` positions
  each side for a window, the near halo plus about ``log2(P)`` far blocks for exponential offsets.
  Every rank derives every other rank's needs from the pattern alone, so each pair of ranks
  exchanges exactly one message each way (``batch_isend_irecv``), only with the ranks that own
  needed keys, and never the whole sequence unless the pattern itself needs it (``causal``).
- **Global tokens, collectives.** The global tokens' keys/values and queries are summed into
  every rank (``all_reduce`` of a tensor holding only the owners' rows). A global query row sees
  every key, so each rank attends the global queries to its *own* keys and the per-rank partial
  softmaxes are merged exactly through their log-sum-exps (an ``all_reduce`` of max, weighted
  outputs and weights), as FlashAttention merges key blocks.
- **Backward.** Both exchanges are :class:`torch.autograd.Function` s whose backward sends the
  gradients of fetched keys/values back to their owners (the reverse point-to-point messages)
  and all-reduces the global rows' gradients, so ``q``, ``k`` and ``v`` of every rank get exactly
  the gradients of the single-process computation.
- **Local compute** is the engine's own structured kernels (``attnkit.kernels.structured``): the
  fetched keys are laid out compactly (halo segments, then global keys not already present) and
  the pattern's offsets become band/offset components of that compact layout, with masks that
  keep every allowed pair exactly once.

Every call first all-gathers a small metadata vector (shapes, dtype, pattern fingerprint, local
errors), so a rank with a mismatched shape makes *every* rank raise the same ``ValueError``
instead of hanging; every collective and point-to-point wait has a timeout.

:func:`communication_volume` is the analytic model of the bytes each rank sends per call (and per
backward); :func:`comm_stats` counts what was actually sent.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..kernels import structured as _structured
from ..kernels.components import AllKeys, Band, KeySet, MaskTerm, Offsets
from ..kernels.structured import Ctx, lower, structured_attention
from ..patterns import (
    Causal,
    Dilated,
    Exponential,
    GlobalTokens,
    Intersection,
    Pattern,
    SlidingWindow,
    Union,
)

__all__ = [
    "sequence_parallel_attention",
    "shard_bounds",
    "shard_sequence",
    "gather_sequence",
    "sequence_layout",
    "halo_exchange",
    "communication_volume",
    "comm_stats",
    "reset_comm_stats",
    "CommStats",
]

#: Default timeout of every collective / point-to-point wait.
DEFAULT_TIMEOUT = timedelta(seconds=120)
# A run of at least this many consecutive offsets becomes a band component (else a gather list).
_MIN_BAND_RUN = 8
# Bytes of a local error message carried in the metadata exchange.
_MSG_LEN = 240
_META_INTS = 12


# ------------------------------------------------------------------------------- sharding


def shard_bounds(length: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of ``rank``'s contiguous shard of a sequence of ``length`` positions.

    The first ``length % world`` ranks hold one position more than the others, so shards differ
    by at most one.
    """
    for name, val, lo in (("length", length, 0), ("world", world, 1), ("rank", rank, 0)):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
    if rank >= world:
        raise ValueError(f"rank must be < world={world}, got {rank}")
    base, extra = divmod(length, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_sequence(x: Tensor, world: int, rank: int, dim: int = 2) -> Tensor:
    """``rank``'s shard (a view) of ``x`` along ``dim`` (default 2: ``(B, H, L, D)``)."""
    start, stop = shard_bounds(x.shape[dim], world, rank)
    return x.narrow(dim, start, stop - start)


def _all_bounds(length: int, world: int) -> tuple[tuple[int, int], ...]:
    return tuple(shard_bounds(length, world, r) for r in range(world))


# ------------------------------------------------------------------------------- comm stats


@dataclass
class CommStats:
    """Bytes this process sent: point-to-point halo messages (forward and backward), payloads
    of data collectives (``all_reduce``: the tensor size, not the algorithm's traffic), and the
    small metadata checks."""

    p2p_bytes: int = 0
    collective_bytes: int = 0
    meta_bytes: int = 0
    p2p_messages: int = 0
    collectives: int = 0
    by_phase: dict = field(default_factory=dict)

    def add(self, phase: str, kind: str, nbytes: int) -> None:
        if kind == "p2p":
            self.p2p_bytes += nbytes
            self.p2p_messages += 1
        elif kind == "collective":
            self.collective_bytes += nbytes
            self.collectives += 1
        else:
            self.meta_bytes += nbytes
        key = f"{phase}.{kind}"
        self.by_phase[key] = self.by_phase.get(key, 0) + nbytes


_STATS = CommStats()


def comm_stats() -> CommStats:
    """A copy of the bytes sent by this process since the last :func:`reset_comm_stats`."""
    return CommStats(_STATS.p2p_bytes, _STATS.collective_bytes, _STATS.meta_bytes,
                     _STATS.p2p_messages, _STATS.collectives, dict(_STATS.by_phase))


def reset_comm_stats() -> None:
    """Zero the counters of :func:`comm_stats`."""
    global _STATS
    _STATS = CommStats()


# ------------------------------------------------------------------------------- comm helpers


@dataclass(frozen=True)
class _Comm:
    group: object
    rank: int
    world: int
    timeout: timedelta

    def peer(self, r: int) -> int:
        """Global rank of group rank ``r`` (point-to-point ops address global ranks)."""
        if self.group is None or self.group is dist.group.WORLD:
            return r
        return dist.get_global_rank(self.group, r)

    def wait(self, work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            raise RuntimeError(
                f"sequence_parallel: {what} on rank {self.rank} failed or timed out after "
                f"{self.timeout.total_seconds():g} s (a rank died, or ranks called it with "
                f"different arguments): {e}"
            ) from e

    def all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM, phase: str = "fwd") -> Tensor:
        _STATS.add(phase, "collective", t.numel() * t.element_size())
        if self.world > 1:
            self.wait(dist.all_reduce(t, op=op, group=self.group, async_op=True), "all_reduce")
        return t

    def all_gather(self, t: Tensor) -> Tensor:
        """``(world, *t.shape)``; for the small metadata vectors."""
        _STATS.add("meta", "meta", t.numel() * t.element_size())
        if self.world == 1:
            return t.unsqueeze(0).clone()
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.wait(dist.all_gather(out, t, group=self.group, async_op=True), "all_gather")
        return torch.stack(out)

    def exchange(self, sends: dict[int, Tensor], recv_shapes: dict[int, tuple[int, ...]],
                 like: Tensor, phase: str) -> dict[int, Tensor]:
        """One message to each rank in ``sends`` and one from each rank in ``recv_shapes``."""
        ops, bufs = [], {}
        for src, shape in sorted(recv_shapes.items()):
            bufs[src] = like.new_empty(shape)
            ops.append(dist.P2POp(dist.irecv, bufs[src], self.peer(src), self.group))
        for dst, t in sorted(sends.items()):
            t = t.contiguous()
            _STATS.add(phase, "p2p", t.numel() * t.element_size())
            ops.append(dist.P2POp(dist.isend, t, self.peer(dst), self.group))
        if ops:
            for w in dist.batch_isend_irecv(ops):
                self.wait(w, "halo exchange (isend/irecv)")
        return bufs


def _comm(group, timeout) -> _Comm:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "sequence_parallel_attention needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun); on one process use "
            "attnkit.attention"
        )
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        timeout = timedelta(seconds=float(timeout))
    if not isinstance(timeout, timedelta):
        raise TypeError(f"timeout must be seconds or a timedelta, got {type(timeout).__name__}")
    return _Comm(group, dist.get_rank(group), dist.get_world_size(group), timeout)


# ------------------------------------------------------------------------------- the pattern


_SUPPORTED = (
    "sliding_window, dilated, exponential, causal, global_tokens and their unions (|) and "
    "intersections (&)"
)


def _split(p: Pattern) -> tuple[Pattern | None, set[int]]:
    """``(band, hubs)``: the translation-invariant part seen by non-global rows (``None`` when
    empty) and the global token positions."""
    if isinstance(p, (SlidingWindow, Dilated, Exponential, Causal)):
        return p, set()
    if isinstance(p, GlobalTokens):
        return None, set(p.indices.tolist())
    if isinstance(p, (Union, Intersection)):
        ba, ha = _split(p.a)
        bb, hb = _split(p.b)
        if isinstance(p, Union):
            band = ba if bb is None else bb if ba is None else Union(ba, bb)
        else:
            band = None if ba is None or bb is None else Intersection(ba, bb)
        return band, ha | hb
    raise ValueError(
        f"sequence_parallel_attention supports {_SUPPORTED}; got {p!r} "
        f"(index-based patterns such as graph/random_keys/block_diagonal are not sharded)"
    )


def _candidate_offsets(p: Pattern, length: int) -> Tensor | None:
    """A sorted superset of the offsets ``p`` can allow (``None``: every offset)."""
    n = length - 1
    if isinstance(p, SlidingWindow):
        return torch.arange(-min(p.w, n), min(p.w, n) + 1)
    if isinstance(p, Dilated):
        r = min(p.w * p.d, n) // p.d * p.d
        return torch.arange(-r, r + 1, p.d)
    if isinstance(p, Exponential):
        return torch.tensor([o for o in p.offsets(length, length) if -n <= o <= n])
    if isinstance(p, Causal):
        return torch.arange(-n, 1)
    a, b = _candidate_offsets(p.a, length), _candidate_offsets(p.b, length)
    if isinstance(p, Union):
        return None if a is None or b is None else torch.unique(torch.cat([a, b]))
    if a is None or b is None:
        return b if a is None else a
    return a[torch.isin(a, b)]


def _runs(offsets: Tensor) -> list[tuple[int, int]]:
    """Maximal runs ``[lo, hi]`` of consecutive ints in a sorted tensor."""
    if offsets.numel() == 0:
        return []
    o = offsets.tolist()
    runs, lo = [], o[0]
    for a, b in zip(o, o[1:]):
        if b != a + 1:
            runs.append((lo, a))
            lo = b
    runs.append((lo, o[-1]))
    return runs


@dataclass(frozen=True)
class _Need:
    """What one rank needs: merged key segments (global, sorted, including its own shard) and
    the global-token keys outside them."""

    segments: tuple[tuple[int, int], ...]
    runs: tuple[tuple[int, int, int], ...]  # (lo, hi, segment index): offset run -> segment
    clipped: tuple[bool, ...]  # per run: its shifted block leaves its segment somewhere
    extra_hubs: tuple[int, ...]


@dataclass(frozen=True)
class _Plan:
    length: int
    bounds: tuple[tuple[int, int], ...]
    band: Pattern | None
    hubs: tuple[int, ...]
    offset_runs: tuple[tuple[int, int], ...]
    needs: tuple[_Need, ...]

    def pieces(self, r: int) -> list[tuple[int, int, int]]:
        """``(owner, a, b)``: rank ``r``'s segments split by owner, in compact order."""
        out = []
        for a, b in self.needs[r].segments:
            for owner, (s, e) in enumerate(self.bounds):
                lo, hi = max(a, s), min(b, e)
                if lo < hi:
                    out.append((owner, lo, hi))
        return out

    def sends(self, r: int) -> dict[int, list[tuple[int, int]]]:
        """Intervals of rank ``r``'s shard that each other rank fetches, in that rank's order."""
        out: dict[int, list[tuple[int, int]]] = {}
        for dst in range(len(self.bounds)):
            if dst != r:
                ivs = [(a, b) for owner, a, b in self.pieces(dst) if owner == r]
                if ivs:
                    out[dst] = ivs
        return out

    def recvs(self, r: int) -> dict[int, list[tuple[int, int]]]:
        out: dict[int, list[tuple[int, int]]] = {}
        for owner, a, b in self.pieces(r):
            if owner != r:
                out.setdefault(owner, []).append((a, b))
        return out

    def halo_positions(self, r: int) -> int:
        """Positions rank ``r`` sends to others (= what others fetch from it)."""
        return sum(b - a for ivs in self.sends(r).values() for a, b in ivs)


def _need(length: int, start: int, stop: int, runs, hubs) -> _Need:
    ivs = [(start, stop)]
    for lo, hi in runs:
        a, b = max(0, start + lo), min(length, stop + hi)
        if a < b:
            ivs.append((a, b))
    ivs.sort()
    segs: list[list[int]] = []
    for a, b in ivs:
        if segs and a <= segs[-1][1]:
            segs[-1][1] = max(segs[-1][1], b)
        else:
            segs.append([a, b])
    seg_runs, clipped = [], []
    for lo, hi in runs:
        a, b = max(0, start + lo), min(length, stop + hi)
        if a >= b:
            continue  # the whole run points outside the sequence for this shard
        idx = next(i for i, (sa, sb) in enumerate(segs) if sa <= a < sb)
        seg_runs.append((lo, hi, idx))
        sa, sb = segs[idx]
        clipped.append(start + lo < sa or stop + hi > sb)
    extra = tuple(h for h in hubs if not any(a <= h < b for a, b in segs))
    return _Need(tuple((a, b) for a, b in segs), tuple(seg_runs), tuple(clipped), extra)


@lru_cache(maxsize=64)
def _plan_cached(key: str, pattern: Pattern, length: int, world: int) -> _Plan:
    del key  # the cache key: the pattern's repr (patterns compare by identity)
    band, hubs = _split(pattern)
    pattern.validate(length, length)
    runs: list[tuple[int, int]] = []
    if band is not None and length > 0:
        cand = _candidate_offsets(band, length)
        if cand is None:
            cand = torch.arange(-(length - 1), length)
        if cand.numel():
            ok = band.allowed(torch.zeros((), dtype=torch.long), cand, length, length)
            runs = _runs(cand[torch.broadcast_to(ok, cand.shape)])
    bounds = _all_bounds(length, world)
    hub_t = tuple(sorted(hubs))
    needs = tuple(_need(length, s, e, runs, hub_t) for s, e in bounds)
    return _Plan(length, bounds, band, hub_t, tuple(runs), needs)


def _plan(pattern: Pattern, length: int, world: int) -> _Plan:
    return _plan_cached(repr(pattern), pattern, length, world)


# ------------------------------------------------------------------------------- autograd comm


def _seq_cat(parts: list[Tensor], like: Tensor, dim: int = 2) -> Tensor:
    if not parts:
        shape = list(like.shape)
        shape[dim] = 0
        return like.new_zeros(shape)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


class _Gather(torch.autograd.Function):
    """Fetch the K/V halo (point-to-point) and the global tokens' K/V and queries (all_reduce).

    ``k (B, Hkv, L_local, D)``, ``v (B, Hkv, L_local, Dv)`` -> ``kc``, ``vc`` over the compact
    key layout ``(B, Hkv, L_compact, .)`` (segments, then the extra global keys);
    ``q (B, Hq, L_local, D)`` -> ``q_hubs (B, Hq, n_hubs, D)``. One message per pair of ranks
    carries K and V side by side. Backward returns fetched gradients to their owners."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: _Plan, comm: _Comm):
        r = comm.rank
        s, _ = plan.bounds[r]
        d = k.shape[3]
        sends, recvs = plan.sends(r), plan.recvs(r)
        msgs = {dst: torch.cat([_seq_cat([t[:, :, a - s:b - s] for a, b in ivs], t)
                                for t in (k, v)], -1)
                for dst, ivs in sends.items()}
        shapes = {src: (*k.shape[:2], sum(b - a for a, b in ivs), d + v.shape[3])
                  for src, ivs in recvs.items()}
        got = comm.exchange(msgs, shapes, k, "fwd")
        kparts, vparts, offs = [], [], dict.fromkeys(got, 0)
        for owner, a, b in plan.pieces(r):
            if owner == r:
                kparts.append(k[:, :, a - s:b - s])
                vparts.append(v[:, :, a - s:b - s])
            else:
                buf = got[owner][:, :, offs[owner]:offs[owner] + b - a]
                offs[owner] += b - a
                kparts.append(buf[..., :d])
                vparts.append(buf[..., d:])
        hubs = plan.hubs
        q_hubs = q.new_zeros(q.shape[0], q.shape[1], len(hubs), q.shape[3])
        if hubs:
            k_hubs, v_hubs, q_hubs = _hub_rows_all_reduce((k, v, q), plan, comm, "fwd")
            extra = plan.needs[r].extra_hubs
            if extra:
                sel = torch.tensor([hubs.index(h) for h in extra], dtype=torch.long,
                                   device=k.device)
                kparts.append(k_hubs.index_select(2, sel))
                vparts.append(v_hubs.index_select(2, sel))
        ctx.plan, ctx.comm = plan, comm
        ctx.shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
        kc, vc = _seq_cat(kparts, k), _seq_cat(vparts, v)
        # Nothing fetched: never return a view of an input.
        kc = kc.clone() if kc.numel() and kc.data_ptr() == k.data_ptr() else kc
        vc = vc.clone() if vc.numel() and vc.data_ptr() == v.data_ptr() else vc
        return kc, vc, q_hubs

    @staticmethod
    def backward(ctx, g_kc: Tensor, g_vc: Tensor, g_qhubs: Tensor):
        plan, comm = ctx.plan, ctx.comm
        r = comm.rank
        s, _ = plan.bounds[r]
        q_shape, k_shape, v_shape = ctx.shapes
        d = k_shape[3]
        g_k, g_v = g_kc.new_zeros(k_shape), g_vc.new_zeros(v_shape)
        back: dict[int, list[Tensor]] = {}
        pos = 0
        for owner, a, b in plan.pieces(r):
            gk, gv = g_kc[:, :, pos:pos + b - a], g_vc[:, :, pos:pos + b - a]
            pos += b - a
            if owner == r:
                g_k[:, :, a - s:b - s] += gk
                g_v[:, :, a - s:b - s] += gv
            else:
                back.setdefault(owner, []).append(torch.cat([gk, gv], -1))
        sends = {owner: _seq_cat(gs, g_kc) for owner, gs in back.items()}
        shapes = {src: (*k_shape[:2], sum(b - a for a, b in ivs), d + v_shape[3])
                  for src, ivs in plan.sends(r).items()}
        got = comm.exchange(sends, shapes, g_kc, "bwd")
        for src, ivs in plan.sends(r).items():
            off = 0
            for a, b in ivs:
                g_k[:, :, a - s:b - s] += got[src][:, :, off:off + b - a, :d]
                g_v[:, :, a - s:b - s] += got[src][:, :, off:off + b - a, d:]
                off += b - a
        g_q = None
        hubs = plan.hubs
        if hubs:
            n = len(hubs)
            g_kh = g_kc.new_zeros(k_shape[0], k_shape[1], n, d)
            g_vh = g_vc.new_zeros(v_shape[0], v_shape[1], n, v_shape[3])
            extra = plan.needs[r].extra_hubs
            if extra:
                sel = torch.tensor([hubs.index(h) for h in extra], dtype=torch.long,
                                   device=g_kc.device)
                g_kh.index_copy_(2, sel, g_kc[:, :, pos:pos + len(extra)])
                g_vh.index_copy_(2, sel, g_vc[:, :, pos:pos + len(extra)])
            g_kh, g_vh, g_qh = _hub_rows_all_reduce((g_kh, g_vh, g_qhubs), plan, comm, "bwd",
                                                    reduce_only=True)
            own, local = _owned_hubs(plan, r, g_kc.device)
            if own.numel():
                g_k.index_add_(2, local, g_kh.index_select(2, own))
                g_v.index_add_(2, local, g_vh.index_select(2, own))
                g_q = g_qh.new_zeros(q_shape)
                g_q.index_add_(2, local, g_qh.index_select(2, own))
        return g_q, g_k, g_v, None, None


def _owned_hubs(plan: _Plan, r: int, device) -> tuple[Tensor, Tensor]:
    """Indices into ``plan.hubs`` of the hubs rank ``r`` owns, and their local positions."""
    s, e = plan.bounds[r]
    own = [i for i, h in enumerate(plan.hubs) if s <= h < e]
    idx = torch.tensor(own, dtype=torch.long, device=device)
    local = torch.tensor([plan.hubs[i] - s for i in own], dtype=torch.long, device=device)
    return idx, local


def _hub_rows_all_reduce(ts: tuple[Tensor, ...], plan: _Plan, comm: _Comm, phase: str,
                         reduce_only: bool = False) -> list[Tensor]:
    """Every rank gets all global tokens' rows of each ``(B, H, L_local, C)`` tensor in ``ts``:
    owners fill theirs, one ``all_reduce`` sums. With ``reduce_only`` the inputs already are
    ``(B, H, n_hubs, C)`` rows to sum."""
    n = len(plan.hubs)
    if reduce_only:
        rows = list(ts)
    else:
        own, local = _owned_hubs(plan, comm.rank, ts[0].device)
        rows = []
        for t in ts:
            h = t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3])
            if own.numel():
                h.index_copy_(2, own, t.index_select(2, local))
            rows.append(h)
    buf = comm.all_reduce(torch.cat([h.reshape(-1).to(rows[0].dtype) for h in rows]),
                          phase=phase)
    out, pos = [], 0
    for h in rows:
        out.append(buf[pos:pos + h.numel()].view(h.shape).to(h.dtype))
        pos += h.numel()
    return out


class _MergeRows(torch.autograd.Function):
    """Exact merge of per-rank partial softmaxes of the global query rows.

    ``out (B, Hkv, G, n, Dv)`` normalized over this rank's keys, ``lse (B, Hkv, G, n)`` ->
    the softmax over all ranks' keys: ``sum_r w_r out_r / sum_r w_r`` with
    ``w_r = exp(lse_r - max_r lse_r)``."""

    @staticmethod
    def forward(ctx, out: Tensor, lse: Tensor, comm: _Comm):
        cd = torch.promote_types(out.dtype, torch.float32)  # merge half inputs in fp32
        m = comm.all_reduce(lse.detach().to(cd, copy=True), op=dist.ReduceOp.MAX)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = torch.exp(lse.to(cd) - m)  # 0 for rows with no local key
        num = out.to(cd) * w.unsqueeze(-1)
        buf = comm.all_reduce(torch.cat([num.reshape(-1), w.reshape(-1)]))
        num = buf[:num.numel()].view(num.shape)
        total = buf[num.numel():].view(w.shape)
        nonempty = total > 0
        total = torch.where(nonempty, total, torch.ones_like(total))
        merged = num / total.unsqueeze(-1)
        ctx.comm, ctx.dtypes = comm, (out.dtype, lse.dtype)
        ctx.save_for_backward(out.to(cd), w / total, merged)
        return merged.to(out.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        out, coef, merged = ctx.saved_tensors
        g = ctx.comm.all_reduce(g.to(out.dtype, copy=True).contiguous(), phase="bwd")  # all ranks
        g_out = coef.unsqueeze(-1) * g
        g_lse = coef * (g * (out - merged)).sum(-1)
        return g_out.to(ctx.dtypes[0]), g_lse.to(ctx.dtypes[1]), None


# ------------------------------------------------------------------------------- masks


class _Pred:
    """Mask predicates over compact indices (used through ``MaskTerm``)."""

    def __init__(self, fn):
        self.fn = fn

    def allowed(self, i: Tensor, j: Tensor, lq: int, lk: int) -> Tensor:
        return self.fn(i, j)


def _in_runs(x: Tensor, runs: tuple[tuple[int, int], ...]) -> Tensor:
    if not runs:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    lo = torch.tensor([a for a, _ in runs], device=x.device)
    hi = torch.tensor([b for _, b in runs], device=x.device)
    idx = torch.searchsorted(lo, x.contiguous(), right=True) - 1
    return (idx >= 0) & (x <= hi[idx.clamp(min=0)])


def _local_components(plan: _Plan, pattern: Pattern, r: int, lq: int, lk: int,
                      kpos: Tensor, seg_id: Tensor, device) -> list:
    """Components over compact keys for this rank's non-global query rows."""
    s, e = plan.bounds[r]
    need = plan.needs[r]
    delta = lk - lq
    starts, c = [], 0
    for a, b in need.segments:
        starts.append(c)
        c += b - a
    hubs = torch.tensor(plan.hubs, dtype=torch.long, device=device)
    qpos = torch.arange(s, e, device=device)
    hub_row = torch.isin(qpos, hubs)
    masks_common = ()
    if bool(hub_row.any()):  # global rows are computed over every rank's keys, not here
        masks_common = (MaskTerm(_Pred(lambda i, j: ~hub_row[i])),)
    comps: list = []
    singles: dict[int, list[int]] = {}
    clipped_seg: dict[int, bool] = {}
    for (lo, hi, si), clip in zip(need.runs, need.clipped):
        shift = starts[si] + s - need.segments[si][0] - delta  # global -> compact offset
        if hi - lo + 1 >= _MIN_BAND_RUN:
            masks = masks_common
            if clip:
                masks = masks + (MaskTerm(_Pred(lambda i, j, si=si: seg_id[j] == si)),)
            comps.append(Band(lo + shift, hi + shift, masks=masks))
        else:
            singles.setdefault(si, []).extend(range(lo + shift, hi + shift + 1))
            clipped_seg[si] = clipped_seg.get(si, False) or clip
    for si, offs in singles.items():
        masks = masks_common
        if clipped_seg[si]:
            masks = masks + (MaskTerm(_Pred(lambda i, j, si=si: seg_id[j] == si)),)
        comps.append(Offsets(tuple(sorted(set(offs))), masks=masks))
    if plan.hubs:
        # Global keys not reached through an offset run: masked by the full predicate.
        is_hub_key = torch.isin(kpos, hubs)
        keys = torch.nonzero(is_hub_key).flatten()
        runs = plan.offset_runs

        def hub_keys_ok(i, j):
            p, q = qpos[i], kpos[j]
            return ~_in_runs(q - p, runs) & pattern.allowed(p, q, plan.length, plan.length)

        comps.append(KeySet(keys, masks=masks_common + (MaskTerm(_Pred(hub_keys_ok)),)))
    return comps


# ------------------------------------------------------------------------------- validation


def _local_error(q, k, v, scale) -> str:
    """A message for bad local input, or ``""`` (checked before any communication)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.dim() != 4:
            return f"{name} must have shape (B, H, L_local, D), got {tuple(t.shape)}"
        if not t.dtype.is_floating_point:
            return f"{name} must be a floating-point tensor, got {t.dtype}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (q.device == k.device == v.device):
        return f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        return f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}"
    if k.shape[1] != v.shape[1] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return (f"k and v must have the same heads Hkv dividing q's heads, got q {q.shape[1]}, "
                f"k {k.shape[1]}, v {v.shape[1]}")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        return (f"q, k, v must hold the same positions (self-attention shards), got L_local "
                f"{q.shape[2]}, {k.shape[2]}, {v.shape[2]}")
    if k.shape[3] != q.shape[3]:
        return f"k must have head dim D={q.shape[3]} like q, got {k.shape[3]}"
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                              or not math.isfinite(scale)):
        return f"scale must be a finite float, got {scale!r}"
    return ""


_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _metadata(comm: _Comm, fields: list[int], msg: str) -> Tensor:
    raw = msg.encode()[:_MSG_LEN]
    vec = torch.zeros(_META_INTS + _MSG_LEN, dtype=torch.long)
    vec[:len(fields)] = torch.tensor(fields, dtype=torch.long)
    if raw:
        vec[_META_INTS:_META_INTS + len(raw)] = torch.tensor(list(raw), dtype=torch.long)
    return comm.all_gather(vec)


def _raise_remote_errors(meta: Tensor) -> None:
    errs = []
    for r, row in enumerate(meta):
        if int(row[0]):
            text = bytes(row[_META_INTS:].tolist()).rstrip(b"\0").decode(errors="replace")
            errs.append(f"rank {r}: {text}")
    if errs:
        raise ValueError("sequence parallel: bad input on " + "; ".join(errs))


def _check_layout(lengths: list[int], what: str) -> int:
    """Global length from the ranks' local lengths; they must follow :func:`shard_bounds`."""
    total, world = sum(lengths), len(lengths)
    expect = [b - a for a, b in _all_bounds(total, world)]
    if lengths != expect:
        raise ValueError(
            f"{what}: ranks hold {lengths} positions, but a sequence of {total} over {world} "
            f"ranks is sharded as {expect} (contiguous shards differing by at most one, "
            f"larger first: use attnkit.distributed.shard_bounds / shard_sequence)"
        )
    return total


def sequence_layout(local_length: int, group=None,
                    timeout: float | timedelta = DEFAULT_TIMEOUT, *,
                    local_error: str = "") -> tuple[int, int, int]:
    """``(L, start, stop)``: the global length and this rank's shard, from every rank's
    ``local_length`` (one all_gather; every rank raises the same error when the lengths do not
    follow :func:`shard_bounds`, or when any rank passes a non-empty ``local_error``, e.g. its
    own input check's message)."""
    comm = _comm(group, timeout)
    bad = isinstance(local_length, bool) or not isinstance(local_length, int) or local_length < 0
    msg = f"local_length must be an int >= 0, got {local_length!r}" if bad else local_error
    meta = _metadata(comm, [int(bool(msg)), 0 if bad else local_length], msg)
    _raise_remote_errors(meta)
    total = _check_layout([int(x) for x in meta[:, 1]], "sequence_layout")
    s, e = shard_bounds(total, comm.world, comm.rank)
    return total, s, e


# ------------------------------------------------------------------------------- public API


def sequence_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    group=None,
    *,
    scale: float | None = None,
    timeout: float | timedelta = DEFAULT_TIMEOUT,
    neighbours_only: bool = False,
) -> Tensor:
    """Exact sparse self-attention over a sequence sharded along its length across ranks.

    Args:
        q: ``(B, Hq, L_local, D)``: this rank's queries, positions ``[start, stop)`` of a
            sequence of ``L`` positions sharded by :func:`shard_bounds` (shards may differ by
            one); k: ``(B, Hkv, L_local, D)``, v: ``(B, Hkv, L_local, Dv)`` for the same
            positions (``Hq % Hkv == 0``: grouped-query heads are shared, not copied).
        pattern: a banded pattern over the *global* sequence (``sliding_window``, ``dilated``,
            ``exponential``, ``causal``, unions / intersections of them) optionally with
            ``global_tokens`` (global positions). The same pattern on every rank.
        group: the process group (default: the world).
        scale: logit scale, default ``1 / sqrt(D)``.
        timeout: seconds (or a timedelta) for every collective / point-to-point wait.
        neighbours_only: refuse (``ValueError``) patterns whose reach exceeds the smallest
            shard, i.e. that would need keys from beyond the adjacent ranks; by default such
            keys are fetched blockwise from whichever ranks own them.

    Returns:
        ``(B, Hq, L_local, Dv)``: rows ``[start, stop)`` of ``attention(q, k, v, pattern)`` on
        the whole sequence. Differentiable (gradients of fetched keys/values return to their
        owners); every rank must call backward when one does, as with any collective.

    Raises:
        ValueError on every rank (never a hang) when any rank's input is bad, shapes or
        patterns differ across ranks, or the shards do not follow :func:`shard_bounds`;
        RuntimeError when a peer does not answer within ``timeout``.
    """
    comm = _comm(group, timeout)
    msg = _local_error(q, k, v, scale)
    if not msg and pattern is None:
        msg = ("pattern=None (dense attention) needs every key on every rank; pass a banded "
               f"pattern ({_SUPPORTED})")
    if not msg and not isinstance(pattern, Pattern):
        msg = f"pattern must be an attnkit.patterns pattern, got {type(pattern).__name__}"
    if not msg:
        try:
            _split(pattern)
        except ValueError as e:
            msg = str(e)
    if msg:
        meta = _metadata(comm, [1], msg)
    else:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        fields = [0, q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3], q.shape[2],
                  _DTYPES.index(q.dtype) if q.dtype in _DTYPES else 99, int(needs_grad),
                  zlib.crc32(repr(pattern).encode()),
                  zlib.crc32(repr(scale).encode())]
        meta = _metadata(comm, fields, "")
    _raise_remote_errors(meta)
    names = ["batch B", "q heads Hq", "k/v heads Hkv", "head dim D", "value dim Dv", None,
             "dtype", "requires_grad (with grad mode)", "pattern", "scale"]
    for col, name in enumerate(names, start=1):
        vals = meta[:, col].tolist()
        if name is not None and len(set(vals)) > 1:
            shown = vals if name not in ("pattern", "scale") else "(differs)"
            raise ValueError(
                f"sequence_parallel_attention: ranks disagree on {name}: {shown} "
                f"(every rank must pass shards of the same tensors and the same pattern)"
            )
    length = _check_layout([int(x) for x in meta[:, 6]], "sequence_parallel_attention")
    if length < comm.world:
        raise ValueError(
            f"sequence_parallel_attention: a sequence of {length} positions over {comm.world} "
            f"ranks leaves ranks without positions; use at most {length} ranks"
        )
    plan = _plan(pattern, length, comm.world)
    if neighbours_only and plan.offset_runs:
        reach = max(abs(plan.offset_runs[0][0]), abs(plan.offset_runs[-1][1]))
        smallest = min(b - a for a, b in plan.bounds)
        if reach > smallest:
            raise ValueError(
                f"pattern {pattern!r} reaches {reach} positions, more than the smallest shard "
                f"({smallest} of {length} over {comm.world} ranks): its keys lie beyond the "
                f"neighbouring ranks; pass neighbours_only=False to fetch them from further "
                f"ranks, or use fewer ranks / a narrower pattern"
            )
    return _attend(q, k, v, pattern, plan, comm, scale)


def _attend(q, k, v, pattern, plan: _Plan, comm: _Comm, scale) -> Tensor:
    r = comm.rank
    s, e = plan.bounds[r]
    B, hq, lq, d = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    device = q.device

    kc, vc, q_hubs = _Gather.apply(q, k, v, plan, comm)
    need = plan.needs[r]
    lk = kc.shape[2]
    kpos = torch.cat([torch.arange(a, b, device=device) for a, b in need.segments]
                     + [torch.tensor(need.extra_hubs, dtype=torch.long, device=device)])
    seg_id = torch.cat([torch.full((b - a,), i, dtype=torch.long, device=device)
                        for i, (a, b) in enumerate(need.segments)]
                       + [torch.full((len(need.extra_hubs),), -1, dtype=torch.long,
                                     device=device)])
    comps = lower(_local_components(plan, pattern, r, lq, lk, kpos, seg_id, device), lq, lk)
    ctx = Ctx(lq=lq, lk=lk, batch=B, hkv=hkv, groups=g, bias=None, score_mod=None,
              dropout_p=0.0, need_lse=False)
    qg = (q * scale).view(B, hkv, g, lq, d)

    def local_rows(qg: Tensor, kc: Tensor, vc: Tensor) -> Tensor:
        return structured_attention(qg, kc, vc, comps, ctx)[0]

    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qg, kc, vc))
    if grad and not _engine_recomputes(comps, ctx, d):
        # A shard is short, so the engine may keep every chunk's intermediates for backward
        # (it recomputes only from three chunks on): recompute here instead, keeping the
        # per-rank peak proportional to the shard.
        out = checkpoint(local_rows, qg, kc, vc, use_reentrant=False)
    else:
        out = local_rows(qg, kc, vc)
    if grad and not out.requires_grad:
        # No allowed key for any local row: keep the graph connected (adding empty sums, an
        # exact 0) so that this rank's backward still joins the exchange's backward messages.
        out = out + (qg[..., :0, :].sum() + kc[:, :, :0].sum() + vc[:, :, :0].sum())
    out = out.reshape(B, hq, lq, dv).to(q.dtype)
    if not plan.hubs:
        return out

    # Global query rows: attend to this rank's own keys (read from the compact layout, so k and
    # v need not be kept for backward), then merge the ranks' partial softmaxes exactly.
    n = len(plan.hubs)
    hub_pos = torch.tensor(plan.hubs, dtype=torch.long, device=device)
    own_key = (kpos >= s) & (kpos < e) & (seg_id >= 0)

    def hub_rows_ok(i, j):
        ok = pattern.allowed(hub_pos[i], kpos[j], plan.length, plan.length)
        return ok & own_key[j]

    hctx = Ctx(lq=n, lk=lk, batch=B, hkv=hkv, groups=g, bias=None, score_mod=None,
               dropout_p=0.0, need_lse=True)
    qh = (q_hubs * scale).view(B, hkv, g, n, d)
    o_r, lse_r = structured_attention(qh, kc, vc,
                                      [AllKeys(masks=(MaskTerm(_Pred(hub_rows_ok)),))], hctx)
    merged = _MergeRows.apply(o_r, lse_r, comm).reshape(B, hq, n, dv).to(q.dtype)
    own, local = _owned_hubs(plan, r, device)
    return out.index_copy(2, local, merged.index_select(2, own))


def _engine_recomputes(comps: list, ctx: Ctx, d: int) -> bool:
    """Whether ``structured_attention`` will recompute its chunks in backward itself (its own
    rule: more than two chunks). Only decides whether to add a checkpoint, never correctness."""
    try:
        width = sum(_structured._width(c, ctx, d) for c in comps) * ctx.batch
        rows = max(ctx.block, int(_structured.CHUNK_ELEMENTS // max(width, 1))
                   // ctx.block * ctx.block)
    except (AttributeError, TypeError):  # engine internals changed: checkpoint anyway
        return False
    return math.ceil(ctx.lq / max(min(rows, ctx.lq), 1)) > 2


# ------------------------------------------------------------------------------- helpers


def gather_sequence(x: Tensor, group=None, dim: int = 2,
                    timeout: float | timedelta = DEFAULT_TIMEOUT) -> Tensor:
    """Concatenate every rank's shard of ``x`` along ``dim`` (shards may differ by one).
    Not differentiable; for checks and small outputs."""
    comm = _comm(group, timeout)
    n = x.shape[dim]
    lens = comm.all_gather(torch.tensor([n], dtype=torch.long)).flatten().tolist()
    width = max(lens)
    pad = list(x.shape)
    pad[dim] = width - n
    xp = torch.cat([x.detach(), x.new_zeros(pad)], dim).contiguous()
    if comm.world == 1:
        return x.detach().clone()
    parts = [torch.empty_like(xp) for _ in range(comm.world)]
    comm.wait(dist.all_gather(parts, xp, group=comm.group, async_op=True), "all_gather")
    return torch.cat([p.narrow(dim, 0, m) for p, m in zip(parts, lens)], dim)


def halo_exchange(x: Tensor, left: int, right: int, group=None, dim: int = 1,
                  timeout: float | timedelta = DEFAULT_TIMEOUT) -> tuple[Tensor, int]:
    """This rank's shard of ``x`` (along ``dim``) extended by up to ``left`` / ``right``
    neighbouring positions (fewer at the sequence ends), fetched point-to-point from the ranks
    owning them. Returns ``(extended, n_left)``. Not differentiable (e.g. token ids for a
    convolutional stem)."""
    for name, val in (("left", left), ("right", right)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be an int >= 0, got {val!r}")
    comm = _comm(group, timeout)
    length, s, e = sequence_layout(x.shape[dim], group, timeout)
    runs = ((-left, right),) if left or right else ()
    needs = tuple(_need(length, a, b, runs, ()) for a, b in _all_bounds(length, comm.world))
    plan = _Plan(length, _all_bounds(length, comm.world), None, (), runs, needs)
    xm = x.detach().movedim(dim, 0)  # (L_local, *rest)
    rest = xm.shape[1:]
    flat = xm.reshape(1, 1, xm.shape[0], -1)
    with torch.no_grad():
        empty = flat.new_zeros(1, 1, flat.shape[2], 0)
        ext, _, _ = _Gather.apply(empty, flat, empty, plan, comm)
    n_left = s - plan.needs[comm.rank].segments[0][0]
    out = ext.reshape(ext.shape[2], *rest).movedim(0, dim)
    return out, n_left


# ------------------------------------------------------------------------------- the model


def communication_volume(
    pattern: Pattern,
    seq_len: int,
    world: int,
    *,
    batch: int = 1,
    q_heads: int = 1,
    kv_heads: int | None = None,
    head_dim: int = 64,
    v_head_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    backward: bool = False,
) -> list[dict]:
    """Analytic bytes each rank sends in one :func:`sequence_parallel_attention` call.

    Per rank: ``halo_positions`` (key/value positions other ranks fetch from it),
    ``halo_bytes = halo_positions * B * Hkv * (D + Dv) * itemsize`` (point-to-point, exact),
    ``fetched_positions`` (what it fetches itself), and for ``n`` global tokens the all_reduce
    payloads ``global_bytes = B * n * (Hkv * (D + Dv) + Hq * D + Hq * (Dv + 2)) * itemsize``
    (global rows' K/V and queries, then the log-sum-exp merge: max, weighted outputs and
    weights; the merge travels in fp32 for half-precision inputs). ``backward=True`` adds the
    backward pass: the gradients of the positions a rank fetched go back to their owners
    (``fetched_positions`` more halo positions sent), and
    ``B * n * (Hkv * (D + Dv) + Hq * D + Hq * Dv)`` all_reduce elements.
    A ring all_reduce moves about ``2 (P - 1) / P`` times its payload per rank.
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be an attnkit.patterns pattern, got {type(pattern)}")
    for name, val in (("seq_len", seq_len), ("world", world), ("batch", batch),
                      ("q_heads", q_heads), ("head_dim", head_dim)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    hkv = q_heads if kv_heads is None else kv_heads
    dv = head_dim if v_head_dim is None else v_head_dim
    size = torch.empty((), dtype=dtype).element_size()
    plan = _plan(pattern, seq_len, world)
    n = len(plan.hubs)
    rows = []
    for r in range(world):
        halo = plan.halo_positions(r)
        fetched = sum(b - a for ivs in plan.recvs(r).values() for a, b in ivs)
        per_pos = batch * hkv * (head_dim + dv) * size
        halo_b = halo * per_pos
        merge = max(size, 4)  # the log-sum-exp merge runs in fp32 at least
        glob = (batch * n * (hkv * (head_dim + dv) + q_heads * head_dim) * size
                + batch * n * q_heads * (dv + 2) * merge)
        if backward:  # gradients of fetched positions go back to their owners
            halo_b += fetched * per_pos
            glob += (batch * n * (hkv * (head_dim + dv) + q_heads * head_dim) * size
                     + batch * n * q_heads * dv * merge)
        s, e = plan.bounds[r]
        rows.append(dict(rank=r, shard=e - s, halo_positions=halo, fetched_positions=fetched,
                         halo_bytes=halo_b, global_bytes=glob, total_bytes=halo_b + glob))
    return rows
