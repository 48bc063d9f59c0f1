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
- **Local compute** is the engine's own structured kernels (``attnkit.kernels.structured``),
  chunk by chunk over the local queries: each chunk reads a compact copy of only the keys it
  needs (its part of the own shard and of the halo, then global keys not already present), and
  the pattern's offsets become band/offset components of that compact layout, with masks that
  keep every allowed pair exactly once.
- **Backward** (one :class:`torch.autograd.Function` for the whole call) recomputes chunk by
  chunk, as FlashAttention does, accumulating straight into one gradient buffer per input;
  then it sends the gradients of fetched keys/values back to their owners (the reverse
  point-to-point messages) and all-reduces the global rows' gradients, so ``q``, ``k`` and
  ``v`` of every rank get exactly the gradients of the single-process computation. Only the
  inputs and the fetched rows are kept between forward and backward, so a rank's peak memory
  is that of one process at the shard's length plus the halo.

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

from ..checks import check_positive_int
from ..functional import check_qkv
from ..kernels import structured as _structured
from ..kernels.components import AllKeys, Band, KeySet, MaskTerm, Offsets
from ..kernels.structured import Ctx, lower, structured_attention
from ..patterns import Pattern, allowed_offsets

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
# Query rows per local chunk (None: sized like the engine's chunks); tests set it small.
_CHUNK_ROWS: int | None = None
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


def _split(p: Pattern) -> tuple[Pattern | None, tuple[int, ...]]:
    """``(band, hubs)``: the translation-invariant part seen by non-global rows (``None`` when
    empty) and the global token positions, as the pattern itself tells them."""
    split = p.split_global()
    if split is None:
        raise ValueError(
            f"sequence_parallel_attention supports {_SUPPORTED}; got {p!r} "
            f"(index-based patterns such as graph/random_keys/block_diagonal are not sharded)"
        )
    return split


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
    band, hub_t = _split(pattern)
    pattern.validate(length, length)
    runs = _runs(allowed_offsets(band, length))
    bounds = _all_bounds(length, world)
    needs = tuple(_need(length, s, e, runs, hub_t) for s, e in bounds)
    return _Plan(length, bounds, band, hub_t, tuple(runs), needs)


def _plan(pattern: Pattern, length: int, world: int) -> _Plan:
    return _plan_cached(repr(pattern), pattern, length, world)


# ------------------------------------------------------------------------------- exchanges


def _seq_cat(parts: list[Tensor], like: Tensor, dim: int = 2) -> Tensor:
    if not parts:
        shape = list(like.shape)
        shape[dim] = 0
        return like.new_zeros(shape)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _fetch_halo(plan: _Plan, comm: _Comm, k: Tensor, v: Tensor, phase: str = "fwd") -> Tensor:
    """The key/value positions rank ``comm.rank`` needs from other ranks, fetched
    point-to-point: ``(B, Hkv, n_halo, D + Dv)`` (K and V side by side, one message per pair of
    ranks), the non-own pieces of :meth:`_Plan.pieces` in order."""
    r = comm.rank
    s = plan.bounds[r][0]
    d = k.shape[3]
    msgs = {dst: torch.cat([_seq_cat([t[:, :, a - s:b - s] for a, b in ivs], t)
                            for t in (k, v)], -1)
            for dst, ivs in plan.sends(r).items()}
    shapes = {src: (*k.shape[:2], sum(b - a for a, b in ivs), d + v.shape[3])
              for src, ivs in plan.recvs(r).items()}
    got = comm.exchange(msgs, shapes, k, phase)
    parts, offs = [], dict.fromkeys(got, 0)
    for owner, a, b in plan.pieces(r):
        if owner != r:
            parts.append(got[owner][:, :, offs[owner]:offs[owner] + b - a])
            offs[owner] += b - a
    return _seq_cat(parts, k.new_zeros(*k.shape[:2], 0, d + v.shape[3]))


def _return_halo_grads(plan: _Plan, comm: _Comm, g_halo: Tensor, g_k: Tensor,
                       g_v: Tensor) -> None:
    """Backward of :func:`_fetch_halo`: send each owner the gradients of the positions fetched
    from it; add what other ranks send back into ``g_k`` / ``g_v`` (in place)."""
    r = comm.rank
    s = plan.bounds[r][0]
    d = g_k.shape[3]
    back: dict[int, list[Tensor]] = {}
    pos = 0
    for owner, a, b in plan.pieces(r):
        if owner != r:
            back.setdefault(owner, []).append(g_halo[:, :, pos:pos + b - a])
            pos += b - a
    sends = {owner: _seq_cat(gs, g_halo) for owner, gs in back.items()}
    shapes = {src: (*g_k.shape[:2], sum(b - a for a, b in ivs), d + g_v.shape[3])
              for src, ivs in plan.sends(r).items()}
    got = comm.exchange(sends, shapes, g_k, "bwd")
    for src, ivs in plan.sends(r).items():
        off = 0
        for a, b in ivs:
            g_k[:, :, a - s:b - s] += got[src][:, :, off:off + b - a, :d]
            g_v[:, :, a - s:b - s] += got[src][:, :, off:off + b - a, d:]
            off += b - a


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


def _merge_rows(out: Tensor, lse: Tensor, comm: _Comm) -> tuple[Tensor, Tensor, Tensor]:
    """Exact merge of the ranks' partial softmaxes of the global query rows.

    ``out (B, Hkv, G, n, Dv)`` normalized over this rank's keys, ``lse (B, Hkv, G, n)`` ->
    ``(merged, coef, out_cd)``: the softmax over all ranks' keys
    ``sum_r w_r out_r / sum_r w_r`` with ``w_r = exp(lse_r - max_r lse_r)`` (in fp32 at least),
    this rank's share ``coef = w_r / sum_r w_r``, and ``out`` in that dtype (for backward)."""
    cd = torch.promote_types(out.dtype, torch.float32)  # merge half inputs in fp32
    m = comm.all_reduce(lse.detach().to(cd, copy=True), op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse.to(cd) - m)  # 0 for rows with no local key
    num = out.to(cd) * w.unsqueeze(-1)
    buf = comm.all_reduce(torch.cat([num.reshape(-1), w.reshape(-1)]))
    num = buf[:num.numel()].view(num.shape)
    total = buf[num.numel():].view(w.shape)
    total = torch.where(total > 0, total, torch.ones_like(total))
    return num / total.unsqueeze(-1), w / total, out.to(cd)


# ------------------------------------------------------------------------------- local chunks


@dataclass
class _Chunk:
    """Local query rows ``[q0, q1)`` and the compact key layout they read: ``slices`` of the
    own shard (source 0) or of the fetched halo (source 1), then the global tokens
    ``hub_idx`` (indices into ``plan.hubs``) outside those slices; ``comps`` are the engine
    components over that layout."""

    q0: int
    q1: int
    slices: list[tuple[int, int, int]]
    hub_idx: Tensor
    comps: list
    lk: int


def _sources(plan: _Plan, r: int) -> list[tuple[int, int, int, int]]:
    """``(a, b, source, base)`` for rank ``r``'s needed positions ``[a, b)``: source 0 = own
    shard at local index ``base``, 1 = the fetched halo at index ``base``."""
    s = plan.bounds[r][0]
    out, hoff = [], 0
    for owner, a, b in plan.pieces(r):
        if owner == r:
            out.append((a, b, 0, a - s))
        else:
            out.append((a, b, 1, hoff))
            hoff += b - a
    return out


def _layout(plan: _Plan, pattern: Pattern, need: _Need, start: int, stop: int,
            device) -> tuple[list, int]:
    """Engine components (lowered) for query positions ``[start, stop)`` over the compact key
    layout of ``need``, and that layout's length."""
    lq = stop - start
    kpos = torch.cat([torch.arange(a, b, device=device) for a, b in need.segments]
                     + [torch.tensor(need.extra_hubs, dtype=torch.long, device=device)])
    seg_id = torch.cat([torch.full((b - a,), i, dtype=torch.long, device=device)
                        for i, (a, b) in enumerate(need.segments)]
                       + [torch.full((len(need.extra_hubs),), -1, dtype=torch.long,
                                     device=device)])
    lk = kpos.numel()
    comps = _local_components(plan, pattern, start, stop, need, lq, lk, kpos, seg_id, device)
    return lower(comps, lq, lk), lk


def _chunks(plan: _Plan, pattern: Pattern, r: int, ctx: Ctx, d: int, dv: int,
            device) -> list[_Chunk]:
    """Split rank ``r``'s query rows into chunks that each read a compact copy of only the keys
    they need, sized like the engine's own chunks (so per-rank memory stays proportional to the
    shard: no copy of the whole shard's keys)."""
    s, e = plan.bounds[r]
    rows = _CHUNK_ROWS
    if rows is None:
        comps, lk = _layout(plan, pattern, plan.needs[r], s, e, device)
        ctx.lk = lk
        rows = _structured.chunk_rows(comps, ctx, d)
    if _CHUNK_ROWS is None:
        # Far offsets (exponential) make a chunk's compact keys many times its rows: keep
        # that copy (and its gradient) to a quarter of the engine's chunk budget.
        per_key = ctx.batch * ctx.hkv * (d + dv)
        while rows > ctx.block:
            need = _need(plan.length, s, min(e, s + rows), plan.offset_runs, plan.hubs)
            keys = sum(b - a for a, b in need.segments) + len(need.extra_hubs)
            if keys * per_key <= _structured.CHUNK_ELEMENTS // 4:
                break
            rows = max(ctx.block, rows // 2 // ctx.block * ctx.block)
    srcs = _sources(plan, r)
    out = []
    for c0 in range(0, e - s, rows):
        c1 = min(e - s, c0 + rows)
        need = _need(plan.length, s + c0, s + c1, plan.offset_runs, plan.hubs)
        slices = []
        for a, b in need.segments:
            for sa, sb, src, base in srcs:
                lo, hi = max(a, sa), min(b, sb)
                if lo < hi:
                    slices.append((src, base + lo - sa, base + hi - sa))
        hub_idx = torch.tensor([plan.hubs.index(h) for h in need.extra_hubs], dtype=torch.long,
                               device=device)
        comps, lk = _layout(plan, pattern, need, s + c0, s + c1, device)
        out.append(_Chunk(c0, c1, slices, hub_idx, comps, lk))
    return out


def _assemble(ch: _Chunk, own: Tensor, halo: Tensor, hubs: Tensor | None) -> Tensor:
    """The chunk's compact keys (or values): ``(B, Hkv, lk, C)``."""
    parts = [(own if src == 0 else halo)[:, :, lo:hi] for src, lo, hi in ch.slices]
    if ch.hub_idx.numel():
        parts.append(hubs.index_select(2, ch.hub_idx))
    return _seq_cat(parts, own[:, :, :0])


def _scatter(ch: _Chunk, g: Tensor, g_own: Tensor, g_halo: Tensor, g_hubs: Tensor | None) -> None:
    """Backward of :func:`_assemble`: add ``g (B, Hkv, lk, C)`` into its sources, in place."""
    pos = 0
    for src, lo, hi in ch.slices:
        (g_own if src == 0 else g_halo)[:, :, lo:hi] += g[:, :, pos:pos + hi - lo]
        pos += hi - lo
    if ch.hub_idx.numel():
        g_hubs.index_add_(2, ch.hub_idx, g[:, :, pos:])


class _ShardAttention(torch.autograd.Function):
    """This rank's rows of the sharded attention, forward and backward in one place.

    Forward fetches the halo (point-to-point) and the global tokens' rows (all_reduce), then
    runs the engine chunk by chunk over compact copies of just the keys each chunk needs, and
    merges the global query rows across ranks. Nothing but the inputs and the (small) fetched
    rows is kept: backward recomputes chunk by chunk (as FlashAttention does) and accumulates
    straight into one gradient buffer per input, then returns the halo gradients to their
    owners and all-reduces the global rows' gradients. Peak memory per rank is therefore that
    of one process at the shard's length, plus the halo."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: _Plan, comm: _Comm, pattern,
                scale: float):
        r = comm.rank
        B, hq, lq, d = q.shape
        hkv, dv = k.shape[1], v.shape[3]
        g = hq // hkv
        device = q.device
        halo = _fetch_halo(plan, comm, k, v)
        k_h = v_h = q_h = None
        if plan.hubs:
            k_h, v_h, q_h = _hub_rows_all_reduce((k, v, q), plan, comm, "fwd")
        ectx = Ctx(lq=lq, lk=lq, batch=B, hkv=hkv, groups=g, bias=None, score_mod=None,
                   dropout_p=0.0, need_lse=False)
        chunks = _chunks(plan, pattern, r, ectx, d, dv, device)
        qg = q.reshape(B, hkv, g, lq, d)
        out = q.new_empty(B, hkv, g, lq, dv)
        for ch in chunks:
            o = _chunk_rows(ch, qg, k, v, halo, k_h, v_h, d, scale)
            out[:, :, :, ch.q0:ch.q1] = o
        saved = [q, k, v, halo]
        ctx.hub_rows = None
        if plan.hubs:
            o_r, lse_r = _hub_partial(q_h, k, v, plan, pattern, r, scale)
            merged, coef, o_cd = _merge_rows(o_r, lse_r, comm)
            own, local = _owned_hubs(plan, r, device)
            out.index_copy_(3, local, merged.to(out.dtype).index_select(3, own))
            saved += [k_h, v_h, q_h, merged, coef, o_cd]
            ctx.hub_rows = True
        ctx.save_for_backward(*saved)
        ctx.plan, ctx.comm, ctx.pattern, ctx.scale, ctx.chunks = plan, comm, pattern, scale, chunks
        return out.view(B, hq, lq, dv)

    @staticmethod
    def backward(ctx, g_out: Tensor):
        plan, comm, pattern, scale = ctx.plan, ctx.comm, ctx.pattern, ctx.scale
        r = comm.rank
        q, k, v, halo = ctx.saved_tensors[:4]
        B, hq, lq, d = q.shape
        hkv, dv = k.shape[1], v.shape[3]
        g = hq // hkv
        g_out = g_out.reshape(B, hkv, g, lq, dv)
        g_k = g_v = g_kh = g_vh = g_qh = k_h = v_h = None
        if ctx.hub_rows:
            k_h, v_h, q_h, merged, coef, o_cd = ctx.saved_tensors[4:]
            own, local = _owned_hubs(plan, r, q.device)
            gm = merged.new_zeros(merged.shape)
            gm.index_copy_(3, own, g_out.index_select(3, local).to(gm.dtype))
            gm = comm.all_reduce(gm, phase="bwd")  # every rank: the merged rows' gradient
            g_o = coef.unsqueeze(-1) * gm
            g_lse = coef * (gm * (o_cd - merged)).sum(-1)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (q_h, k, v)]
                o_r, lse_r = _hub_partial(*leaves, plan, pattern, r, scale)
                g_qh, g_k, g_v = torch.autograd.grad(
                    (o_r, lse_r), leaves, (g_o.to(o_r.dtype), g_lse.to(lse_r.dtype)),
                    allow_unused=True)
            # accumulated into in place below: own fresh, contiguous buffers
            g_k, g_v = (None if t is None else t.contiguous() for t in (g_k, g_v))
            g_kh, g_vh = torch.zeros_like(k_h), torch.zeros_like(v_h)
            g_qh = torch.zeros_like(q_h) if g_qh is None else g_qh
        g_k = torch.zeros_like(k) if g_k is None else g_k
        g_v = torch.zeros_like(v) if g_v is None else g_v
        g_q = torch.zeros_like(q).view(B, hkv, g, lq, d)
        g_halo = torch.zeros_like(halo)
        qg = q.reshape(B, hkv, g, lq, d)
        for ch in ctx.chunks:
            with torch.enable_grad():
                qc = qg[:, :, :, ch.q0:ch.q1].detach().requires_grad_()
                kc, vc = _chunk_kv(ch, k, v, halo, k_h, v_h, d)
                kc, vc = kc.detach().requires_grad_(), vc.detach().requires_grad_()
                o = _attend_chunk(ch, qc, kc, vc, scale)
                if not o.requires_grad:  # no allowed key in this chunk
                    continue
                gq, gk, gv = torch.autograd.grad(o, (qc, kc, vc),
                                                 g_out[:, :, :, ch.q0:ch.q1].to(o.dtype),
                                                 allow_unused=True)
            if gq is not None:
                g_q[:, :, :, ch.q0:ch.q1] += gq
            for gt, g_own, g_hal, g_hub in ((gk, g_k, g_halo[..., :d], g_kh),
                                            (gv, g_v, g_halo[..., d:], g_vh)):
                if gt is not None:
                    _scatter(ch, gt, g_own, g_hal, g_hub)
        _return_halo_grads(plan, comm, g_halo, g_k, g_v)
        g_q = g_q.view(B, hq, lq, d)
        if ctx.hub_rows:
            g_kh, g_vh, g_qh = _hub_rows_all_reduce((g_kh, g_vh, g_qh), plan, comm, "bwd",
                                                    reduce_only=True)
            if own.numel():
                g_k.index_add_(2, local, g_kh.index_select(2, own))
                g_v.index_add_(2, local, g_vh.index_select(2, own))
                g_q.index_add_(2, local, g_qh.index_select(2, own))
        return g_q, g_k, g_v, None, None, None, None


def _chunk_kv(ch: _Chunk, k, v, halo, k_h, v_h, d: int) -> tuple[Tensor, Tensor]:
    return (_assemble(ch, k, halo[..., :d], k_h), _assemble(ch, v, halo[..., d:], v_h))


def _attend_chunk(ch: _Chunk, qc: Tensor, kc: Tensor, vc: Tensor, scale: float) -> Tensor:
    """Engine attention of the chunk's queries ``(B, Hkv, G, nq, D)`` on its compact keys."""
    B, hkv, g, nq, _ = qc.shape
    if not ch.comps:
        return qc.new_zeros(B, hkv, g, nq, vc.shape[3])
    ectx = Ctx(lq=nq, lk=ch.lk, batch=B, hkv=hkv, groups=g, bias=None, score_mod=None,
               dropout_p=0.0, need_lse=False)
    return structured_attention(qc * scale, kc, vc, ch.comps, ectx)[0]


def _chunk_rows(ch: _Chunk, qg, k, v, halo, k_h, v_h, d: int, scale: float) -> Tensor:
    kc, vc = _chunk_kv(ch, k, v, halo, k_h, v_h, d)
    return _attend_chunk(ch, qg[:, :, :, ch.q0:ch.q1], kc, vc, scale)


def _hub_partial(q_h: Tensor, k: Tensor, v: Tensor, plan: _Plan, pattern: Pattern, r: int,
                 scale: float) -> tuple[Tensor, Tensor]:
    """The global query rows ``q_h (B, Hq, n, D)`` attended to this rank's own keys only:
    ``(out (B, Hkv, G, n, Dv), lse (B, Hkv, G, n))``, merged across ranks by
    :func:`_merge_rows`."""
    B, hq, n, d = q_h.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    s = plan.bounds[r][0]
    hub_pos = torch.tensor(plan.hubs, dtype=torch.long, device=q_h.device)

    def hub_rows_ok(i, j):
        return pattern.allowed(hub_pos[i], s + j, plan.length, plan.length)

    hctx = Ctx(lq=n, lk=lk, batch=B, hkv=hkv, groups=g, bias=None, score_mod=None,
               dropout_p=0.0, need_lse=True)
    return structured_attention((q_h * scale).view(B, hkv, g, n, d), k, v,
                                [AllKeys(masks=(MaskTerm(_Pred(hub_rows_ok)),))], hctx)


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


def _local_components(plan: _Plan, pattern: Pattern, s: int, e: int, need: _Need, lq: int,
                      lk: int, kpos: Tensor, seg_id: Tensor, device) -> list:
    """Components over the compact keys of ``need`` for the non-global query rows among
    positions ``[s, e)``."""
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
    """A message for bad local input, or ``""`` (checked before any communication, by the
    engine's own input check, so every rank can raise it)."""
    try:
        check_qkv(q, k, v, scale=scale, sharded=True)
    except (TypeError, ValueError) as e:
        return str(e)
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
        reach = max(pattern.halo(length))
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
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    return _ShardAttention.apply(q, k, v, plan, comm, pattern, scale)


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
    halo = _fetch_halo(plan, comm, flat, flat[..., :0])
    parts = [flat[:, :, base:base + b - a] if src == 0 else halo[:, :, base:base + b - a]
             for a, b, src, base in _sources(plan, comm.rank)]
    ext = _seq_cat(parts, flat)
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
        check_positive_int(name, val)
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
