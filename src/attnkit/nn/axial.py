"""Axial attention: self-attention along one spatial axis at a time, for images and volumes.

Full self-attention over the ``N`` voxels of a volume costs ``O(N^2)`` memory. Axial attention
attends along the first axis, then the second, then the third: every voxel only sees the
``L_a`` voxels on its line along axis ``a``, so one layer costs ``O(N * sum_a L_a)`` work and,
chunked over lines, ``O(N)`` memory; after all axes every voxel has (indirectly) seen the whole
volume. Each axis is one :func:`attnkit.attention` call on strided views of the voxels'
projection, shaped ``(B, *other axes, H, L, d)``: the engine's short-sequence kernel reads them in
place and never keeps an ``L x L`` score matrix per line beyond a thread's own buffer. Masks,
relative-position biases, dropout and requested maps take a chunked path (lines copied into
batches, one engine call per chunk) whose temporaries are bounded by ``chunk_size``.

Layouts. :class:`AxialAttention` works channels last by default: ``x (B, *spatial, C)`` with
``len(spatial) == num_axes`` (``(B, H, W, C)`` for images, ``(B, D, H, W, C)`` for volumes), as
a transformer's token tensors are. ``channels_first=True`` takes and returns ``(B, C, *spatial)``
(``(B, C, D, H, W)``, the layout of MONAI, torchvision convolutions and lucidrains'
``axial-attention`` by default); it moves the channels last on the way in and back on the way out
(a view each way, so one copy in :meth:`AxialAttention.forward`'s projection, as for any
non-contiguous input). Axis ``a`` always means spatial axis ``a`` (``D`` first for volumes),
whatever the layout; masks are ``(B, *spatial)`` in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive_int
from ..functional import attention
from ..kernels.short import short_shape_ok

__all__ = ["AxialAttention", "AxialMaps", "axial_mask"]

# Score-matrix elements (lines * heads * L * L) one engine call may touch; bounds the per-chunk
# temporaries (weights, combined bias) to ~32 MB in fp32 while keeping calls few.
_CHUNK_ELEMENTS = 1 << 23


class _UnbindPacked(torch.autograd.Function):
    """``x.unbind(dim)`` whose backward hands back the gradients' own buffer when they already
    form the packed layout (see :func:`unbind_packed`)."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int):
        ctx.dim, ctx.shape, ctx.stride = dim, x.shape, x.stride()
        return x.unbind(dim)

    @staticmethod
    def backward(ctx, *grads):
        dim, shape, stride = ctx.dim, ctx.shape, ctx.stride
        first = grads[0]
        packed = all(g is not None for g in grads) and all(
            g.stride() == first.stride() and g.dtype == first.dtype
            and g.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            and g.storage_offset() == first.storage_offset() + i * stride[dim]
            for i, g in enumerate(grads)
        ) and first.stride() == stride[:dim] + stride[dim + 1:]
        if packed:  # the gradients are the slices of one buffer laid out like x: no copy
            return first.as_strided(shape, stride, first.storage_offset()), None
        grads = [torch.zeros(shape[:dim] + shape[dim + 1:], dtype=first.dtype, device=first.device)
                 if g is None else g for g in grads]
        return torch.stack(grads, dim), None


def unbind_packed(x: Tensor, dim: int) -> tuple[Tensor, ...]:
    """``x.unbind(dim)`` (e.g. q, k, v of a packed ``(..., 3, H, d)`` projection) whose backward
    skips the stacking copy when the slices' gradients already sit in one buffer laid out like
    ``x`` (the engine's short-sequence kernel writes them so)."""
    if not torch.is_grad_enabled() or not x.requires_grad:
        return x.unbind(dim)
    return _UnbindPacked.apply(x, dim)


@dataclass
class AxialMaps:
    """Attention maps of one :class:`AxialAttention` call.

    Attributes:
        per_axis: one tensor per axis ``a``, shape ``(B, H, *spatial, L_a)``: the weights each
            voxel gives to the ``L_a`` voxels of its line along axis ``a`` (indexed by their
            coordinate on that axis).
        effective: ``(B, *spatial)``: the composed (head-averaged) map of the query voxel over
            the whole volume, ``e_q^T A_last ... A_first`` with ``A_a`` the head-averaged
            axis-``a`` attention matrix; sums to 1 for a valid query voxel.
        query: the query voxel's coordinates.
    """

    per_axis: list[Tensor]
    effective: Tensor
    query: tuple[int, ...]


class AxialAttention(nn.Module):
    """Multi-head self-attention applied along each spatial axis in turn (axis 0 first).

    Each axis has its own QKV and output projections; the output of axis ``a`` is the input of
    axis ``a + 1`` (no residual inside the layer: wrap it in a block for that). Since nothing
    sits between axis ``a``'s output projection and axis ``a + 1``'s QKV projection, the forward
    pass multiplies the two weights (``(3C x C) @ (C x C)``, negligible) and applies them as one
    projection: same function and gradients, one ``N x C x C`` product fewer per axis
    (see :meth:`projection`).

    Args:
        dim: channels ``C`` (last dimension of the input); divisible by ``num_heads``.
        num_heads: attention heads ``H``.
        num_axes: spatial axes (2 for images, 3 for volumes, any ``>= 1``).
        chunk_size: lines per engine call on the chunked path (masks, relative bias, dropout,
            maps; ``None``: chosen so one call touches at most ``2**23`` score elements).
            Bounds its temporaries independently of the volume size. (Plain lines need no
            chunks: the short-sequence kernel keeps only per-thread buffers.)
        rel_pos_max_distance: if set, each axis gets a learned relative-position bias table
            ``(H, 2 * max_distance + 1)`` indexed by the clipped offset ``key - query`` along
            that axis; separate tables per axis let the layer learn anisotropic voxel spacing.
        dropout: dropout on the attention weights (training only).
        bias: whether the projections have a bias.
        channels_first: take and return ``(B, C, *spatial)`` instead of the default
            ``(B, *spatial, C)`` (see the module docstring's "Layouts").

    Shapes:
        ``x``: ``(B, *spatial, C)``, or ``(B, C, *spatial)`` with ``channels_first``;
        ``mask``: ``(B, *spatial)``; output: the layout of ``x``. Attention maps
        (:class:`AxialMaps`) are indexed by spatial position in both layouts.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_axes: int = 3,
        chunk_size: int | None = None,
        *,
        rel_pos_max_distance: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        channels_first: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(channels_first, bool):
            raise TypeError(f"channels_first must be a bool, got {type(channels_first).__name__}")
        self.channels_first = channels_first
        for name, value in (("dim", dim), ("num_heads", num_heads), ("num_axes", num_axes)):
            check_positive_int(name, value)
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        check_positive_int("chunk_size", chunk_size, optional=True)
        if rel_pos_max_distance is not None and (
            not isinstance(rel_pos_max_distance, int) or rel_pos_max_distance < 0
        ):
            raise ValueError(
                f"rel_pos_max_distance must be None or an int >= 0, got {rel_pos_max_distance!r}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dim, self.num_heads, self.num_axes = dim, num_heads, num_axes
        self.head_dim = dim // num_heads
        self.chunk_size = chunk_size
        self.dropout = dropout
        self.rel_pos_max_distance = rel_pos_max_distance
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim, bias=bias) for _ in range(num_axes))
        self.out = nn.ModuleList(nn.Linear(dim, dim, bias=bias) for _ in range(num_axes))
        if rel_pos_max_distance is not None:
            width = 2 * rel_pos_max_distance + 1
            self.rel_pos = nn.ParameterList(
                nn.Parameter(torch.zeros(num_heads, width)) for _ in range(num_axes)
            )
        else:
            self.rel_pos = None

    # ----------------------------------------------------------------------------- checks

    def _check(self, x: Tensor, mask: Tensor | None) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        spatial = ", ".join(f"S{i}" for i in range(self.num_axes))
        first = self.channels_first
        want = f"(B, {self.dim}, {spatial})" if first else f"(B, {spatial}, {self.dim})"
        layout = "channels first" if first else "channels last"
        if x.dim() != self.num_axes + 2:
            raise ValueError(
                f"x must have shape {want} ({layout}, {self.num_axes} spatial axes), "
                f"got {x.dim()} dims {tuple(x.shape)}"
            )
        if x.shape[1 if first else -1] != self.dim:
            raise ValueError(
                f"x must have {self.dim} channels in its {'second' if first else 'last'} "
                f"dimension {want}, got shape {tuple(x.shape)}"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError("mask must be a bool tensor (True = valid voxel)")
            want_mask = (x.shape[0], *x.shape[2:]) if first else tuple(x.shape[:-1])
            if tuple(mask.shape) != tuple(want_mask):
                raise ValueError(
                    f"mask must have shape (B, *spatial) = {tuple(want_mask)}, "
                    f"got {tuple(mask.shape)}"
                )

    def _query(self, query, spatial: tuple[int, ...]) -> tuple[int, ...]:
        if query is None:
            return tuple(s // 2 for s in spatial)
        query = tuple(int(i) for i in query)
        if len(query) != self.num_axes or any(not 0 <= i < s for i, s in zip(query, spatial)):
            raise ValueError(f"query must be {self.num_axes} coordinates within {spatial}, "
                             f"got {query}")
        return query

    # ------------------------------------------------------------------------------ pieces

    def relative_bias(self, axis: int, length: int) -> Tensor | None:
        """``(H, L, L)`` learned bias of axis ``axis`` for a line of ``length`` voxels, or None."""
        if self.rel_pos is None:
            return None
        md = self.rel_pos_max_distance
        pos = torch.arange(length, device=self.rel_pos[axis].device)
        offset = (pos.view(1, -1) - pos.view(-1, 1)).clamp(-md, md) + md  # key - query
        return self.rel_pos[axis][:, offset]

    def lines_per_chunk(self, length: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        per_line = self.num_heads * length * max(length, self.head_dim)
        return max(1, _CHUNK_ELEMENTS // per_line)

    def projection(self, axis: int, fold_previous: bool = False) -> tuple[Tensor, Tensor | None]:
        """Weight ``(3C, C)`` and bias ``(3C,)`` (or None) giving axis ``axis``'s q, k, v.

        The rows are the query, key and value projections of ``self.qkv[axis]``, with the
        softmax scale ``1/sqrt(d)`` folded into the query rows (so the engine runs with
        ``scale=1``). With ``fold_previous`` (``axis > 0``), the previous axis' output projection
        ``self.out[axis - 1]`` is folded in as well: nothing nonlinear sits between the two, so
        ``qkv(out(o)) = o @ (W_qkv W_out)^T + (W_qkv b_out + b_qkv)`` maps the previous axis'
        attention output ``o`` straight to this axis' q, k, v. This saves one ``(N x C) @ (C x C)``
        product (and its two backward products and its stored activation) per axis, and
        gradients still reach both modules' parameters through the tiny ``(3C x C) @ (C x C)``
        product.
        """
        C = self.dim
        w, b = self.qkv[axis].weight, self.qkv[axis].bias
        if fold_previous:
            if axis < 1:
                raise ValueError(f"fold_previous needs axis >= 1, got axis={axis}")
            w_out, b_out = self.out[axis - 1].weight, self.out[axis - 1].bias
            if b_out is not None:
                b = w @ b_out if b is None else torch.addmv(b, w, b_out)
            w = w @ w_out
        scale = torch.ones(3 * C, 1, dtype=w.dtype, device=w.device)
        scale[:C] = 1.0 / math.sqrt(self.head_dim)
        return w * scale, None if b is None else b * scale.view(-1)

    def attend(
        self,
        h: Tensor,
        axis: int,
        weight: Tensor,
        proj_bias: Tensor | None,
        valid: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Project ``h (B, *spatial, C_in)`` to q, k, v with ``weight (3C, C_in)`` / ``proj_bias
        (3C,)`` (query rows pre-scaled, see :meth:`projection`) and attend along axis ``axis``.

        Returns ``(o (B, *spatial, C), weights (B, H, *spatial, L) or None)`` with ``o`` the
        heads' concatenated outputs *before* any output projection. ``o`` is a view whose memory
        is ordered line by line along ``axis``.
        """
        spatial, C_in, C = tuple(h.shape[1:-1]), h.shape[-1], self.dim
        H, d, L = self.num_heads, self.head_dim, spatial[axis]
        rel = self.relative_bias(axis, L)
        dropout_p = self.dropout if self.training else 0.0
        if (valid is None and rel is None and not need_weights and not dropout_p
                and h.device.type == "cpu"
                and short_shape_ok(h.numel() // (C_in * L), L, L, d, d, h.dtype)):
            # Plain lines: one projection of every voxel, and q, k, v as strided views
            # (B, *other axes, H, L, d) of it, which the engine's short-sequence kernel reads in
            # place; its output comes back in voxel order, and backward hands the packed
            # q/k/v gradient to the projection without stacking (unbind_packed).
            qkv = F.linear(h, weight, proj_bias).view(*h.shape[:-1], 3, H, d)
            q, k, v = (t.movedim(axis + 1, -2) for t in unbind_packed(qkv, -3))
            o = attention(q, k, v, scale=1.0)
            return o.movedim(-2, axis + 1).reshape(*h.shape[:-1], C), None
        # Put the axis just before the channels: rows of `lines` are the axis' lines. (One copy
        # of the C_in-channel input; projecting first and handing SDPA strided q/k/v with the
        # line axis outermost is about 2x slower in SDPA's CPU kernel.)
        moved = h.movedim(axis + 1, -2)
        batch_shape = moved.shape[:-2]  # (B, *other axes)
        lines = moved.reshape(-1, L, C_in)
        keep = None
        if valid is not None:
            keep = valid.movedim(axis + 1, -1).reshape(-1, L)
            # A line with no valid voxel only holds padded queries (zeroed by the caller);
            # letting it see all keys keeps every softmax row non-empty -> fused SDPA path.
            keep = keep | ~keep.any(-1, keepdim=True)
        if rel is not None:
            rel = rel.to(h.dtype)
        step = self.lines_per_chunk(L)
        outs, maps = [], []
        for s in range(0, lines.shape[0], step):
            chunk = lines if step >= lines.shape[0] else lines[s:s + step]
            n = chunk.shape[0]
            # One (3C)-wide projection; q, k, v are strided views (n, H, L, d) of its output,
            # which SDPA reads in place. Backward stacks their gradients into one buffer (the
            # transpose from SDPA's (n, H, L, d) gradients is needed anyway) and runs a single
            # (N x 3C) @ (3C x C_in) product for the input gradient.
            q, k, v = (t.transpose(1, 2) for t in
                       F.linear(chunk, weight, proj_bias).view(n, L, 3, H, d).unbind(2))
            bias = None if rel is None else rel.unsqueeze(0)  # (1, H, L, L)
            if keep is not None:
                kk = keep[s:s + step].view(n, 1, 1, L)
                bias = kk if rel is None else bias.masked_fill(~kk, -math.inf)
            res = attention(q, k, v, bias=bias, scale=1.0, dropout_p=dropout_p,
                            return_weights=need_weights)
            if need_weights:
                o, w = res
                maps.append(w)  # (n, H, L, L)
            else:
                o = res
            outs.append(o.transpose(1, 2).reshape(n, L, C))  # SDPA's output is (n, L, H, d)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # cat would copy a lone chunk
        out = out.view(*batch_shape, L, C).movedim(-2, axis + 1)
        if not need_weights:
            return out, None
        # (lines, H, Lq, Lk) -> (B, *others, H, Lq, Lk) -> (B, H, *spatial, Lk)
        w = (maps[0] if len(maps) == 1 else torch.cat(maps)).view(*batch_shape, H, L, L)
        w = w.movedim(-3, 1)
        return out, w.movedim(-2, axis + 2)

    def axis_step(
        self, h: Tensor, axis: int, valid: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Attention along one axis. ``h (B, *spatial, C)``, ``valid (B, *spatial)`` bool or None.

        Returns ``(out (B, *spatial, C), weights (B, H, *spatial, L) or None)``, ``out`` after
        this axis' output projection. Equals dense attention over all voxels with a mask
        allowing only pairs on the same axis line (and, with ``valid``, only valid keys).
        (:meth:`forward` chains the axes with the output projections folded, see
        :meth:`projection`; this is the unfolded single step.)
        """
        o, w = self.attend(h, axis, *self.projection(axis), valid, need_weights)
        return self.out[axis](o), w

    # ------------------------------------------------------------------------------ forward

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        need_weights: bool = False,
        query: tuple[int, ...] | None = None,
    ) -> Tensor | tuple[Tensor, AxialMaps]:
        """Axial self-attention.

        Args:
            x: ``(B, *spatial, C)`` channels last, ``len(spatial) == num_axes``; with
                ``channels_first=True``, ``(B, C, *spatial)``.
            mask: optional ``(B, *spatial)`` bool, True = valid voxel. Padded voxels are never
                attended to and their outputs are 0.
            need_weights: also return :class:`AxialMaps` (per-axis maps are
                ``O(N * L * H)`` memory: for small volumes / inspection).
            query: voxel whose composed effective map is returned (default: the centre).

        Returns:
            ``out`` in the layout of ``x``, or ``(out, AxialMaps)`` when ``need_weights``.
        """
        self._check(x, mask)
        if self.channels_first:
            res = self._forward(x.movedim(1, -1), mask, need_weights, query)
            if need_weights:
                return res[0].movedim(-1, 1), res[1]
            return res.movedim(-1, 1)
        return self._forward(x, mask, need_weights, query)

    def _forward(self, x: Tensor, mask: Tensor | None, need_weights: bool,
                 query: tuple[int, ...] | None) -> Tensor | tuple[Tensor, AxialMaps]:
        """:meth:`forward` on a checked channels-last ``x (B, *spatial, C)``."""
        h = x
        if mask is not None:
            # Padded voxels are never keys, but NaN * 0 would still leak through the softmax.
            h = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        per_axis = []
        for axis in range(self.num_axes):
            # h is the previous axis' attention output before its output projection (folded
            # into this axis' q/k/v projection), or the input for axis 0.
            h, w = self.attend(h, axis, *self.projection(axis, fold_previous=axis > 0), mask,
                               need_weights)
            per_axis.append(w)
        h = self.out[-1](h)
        if mask is not None:
            h = h.masked_fill(~mask.unsqueeze(-1), 0.0)
        h = h.contiguous()
        if not need_weights:
            return h
        q = self._query(query, tuple(x.shape[1:-1]))
        return h, AxialMaps(per_axis, compose_effective_map(per_axis, q), q)


def compose_effective_map(per_axis: list[Tensor], query: tuple[int, ...]) -> Tensor:
    """``(B, *spatial)`` row ``query`` of ``A_last @ ... @ A_first`` (head-averaged axis maps).

    ``per_axis[a]`` is ``(B, H, *spatial, L_a)`` as in :class:`AxialMaps`.
    """
    first = per_axis[0]
    B, spatial = first.shape[0], tuple(first.shape[2:-1])
    r = first.new_zeros(B, *spatial)
    r[(slice(None), *query)] = 1.0
    for axis in reversed(range(len(per_axis))):
        w = per_axis[axis].mean(1).movedim(axis + 1, -2)  # (B, *others, Lq, Lk)
        rm = r.movedim(axis + 1, -1)  # (B, *others, Lq)
        r = torch.einsum("...q,...qk->...k", rm, w).movedim(-1, axis + 1)
    return r


def axial_mask(spatial: tuple[int, ...], axis: int) -> Tensor:
    """``(N, N)`` bool mask over flattened voxels (row-major): True where two voxels lie on the
    same line along ``axis`` (equal coordinates on every other axis). For dense references."""
    coords = torch.stack(
        torch.meshgrid(*[torch.arange(s) for s in spatial], indexing="ij"), -1
    ).reshape(-1, len(spatial))
    others = [a for a in range(len(spatial)) if a != axis]
    c = coords[:, others]
    return (c.unsqueeze(1) == c.unsqueeze(0)).all(-1)
