"""Dense attention over many short sequences on the CPU: the compiled kernels of
``short_cpu.c`` (:mod:`.native`) as one differentiable function.

Axial attention runs a 32-long attention per line and head, thousands of times per axis; a
ViT's patch sequences are similar. Torch's fused SDPA serves each such sequence with machinery
sized for long ones (and zero-fills its gradient buffers, and wants q/k/v in its own layout);
here every sequence (all its heads) is one work item of small register-blocked products,
q/k/v are read in place through their strides, and backward recomputes the probabilities from
the saved log-sum-exp.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import native

__all__ = ["SHORT_MAX_LEN", "short_attention", "short_ok", "short_shape_ok"]

#: Longest query or key sequence the kernel takes (with heads of at most
#: :data:`SHORT_NARROW_DIM` channels; :data:`SHORT_WIDE_MAX_LEN` for wider heads). Its per-thread
#: buffers hold a few ``L x L`` blocks; longer sequences and wider heads are served well by
#: SDPA's tiled BLAS calls. Measured (2 threads, forward + backward against SDPA): 1.2-1.6x
#: faster for L <= 32, about even at L = 64 with d = 32-64, 1.1-1.2x at L = 128 with d <= 16,
#: but 0.7x at L = 96-128 with d = 32.
SHORT_MAX_LEN = 128
SHORT_WIDE_MAX_LEN = 64
SHORT_NARROW_DIM = 16
#: Widest head (channels of q/k or v) the kernel takes.
SHORT_MAX_DIM = 256


class _ShortAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        out, lse = native.short_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        q, k, v, lse = ctx.saved_tensors
        dq, dk, dv = native.short_backward(q, k, v, dout, lse, ctx.scale)
        return dq, dk, dv, None


def short_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax(scale * q k^T) v`` per sequence and head, differentiable.

    Args:
        q: ``(*batch, Hq, Lq, D)``; k: ``(*batch, Hkv, Lk, D)``; v: ``(*batch, Hkv, Lk, Dv)``,
            ``Hq % Hkv == 0``, fp32/fp64 CPU (see :func:`short_ok`); any strides.
    Returns:
        ``(*batch, Hq, Lq, Dv)``, laid out in memory like ``q``.
    """
    return _ShortAttention.apply(q, k, v, scale)


def short_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether :func:`short_attention` serves this call: CPU fp32/fp64, short sequences (see
    :data:`SHORT_MAX_LEN`), and enough sequences to keep every thread busy."""
    return (all(t.device.type == "cpu" and t.dtype == q.dtype for t in (q, k, v))
            and short_shape_ok(q.shape[:-3].numel(), q.shape[-2], k.shape[-2], q.shape[-1],
                               v.shape[-1], q.dtype))


def short_shape_ok(sequences: int, lq: int, lk: int, d: int, dv: int,
                   dtype: torch.dtype) -> bool:
    """:func:`short_ok` from the sizes alone (CPU assumed): ``sequences`` is the product of
    the batch dims."""
    longest = SHORT_MAX_LEN if max(d, dv) <= SHORT_NARROW_DIM else SHORT_WIDE_MAX_LEN
    return (0 < lq <= longest and 0 < lk <= longest
            and 0 < d <= SHORT_MAX_DIM and 0 < dv <= SHORT_MAX_DIM
            and dtype in (torch.float32, torch.float64)
            and sequences >= torch.get_num_threads()
            and native.short_available())
