"""Cross-attention: queries from one sequence attend over another ("context"), e.g. text tokens
over audio frames. A thin layer over :func:`attnkit.attention`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..checks import check_positive_int
from ..functional import attention

__all__ = ["CrossAttention"]


class CrossAttention(nn.Module):
    """Multi-head cross-attention with a padding mask for the context.

    The padding mask follows torch's convention (as :class:`attnkit.nn.MultiheadAttention`):
    ``key_padding_mask`` is True at padded context positions. The older ``context_mask`` (True
    at *real* positions) still works for one release, with a ``DeprecationWarning``.

    Args:
        query_dim: feature size of the queries ``x (B, Lq, query_dim)``.
        context_dim: feature size of the context ``context (B, Lk, context_dim)``.
        num_heads: number of attention heads.
        head_dim: size of each head (default ``query_dim // num_heads``).
        out_dim: output feature size (default ``query_dim``).
        qkv_bias: learn biases in the query/key/value projections.
        dropout: dropout on the attention weights (training only).
        max_query_len, max_context_len: optional length limits; longer inputs raise
            ``ValueError`` (a guard against accidentally quadratic memory).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        out_dim: int | None = None,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        max_query_len: int | None = None,
        max_context_len: int | None = None,
    ) -> None:
        super().__init__()
        for name, val in (("query_dim", query_dim), ("context_dim", context_dim),
                          ("num_heads", num_heads)):
            check_positive_int(name, val)
        if head_dim is None:
            if query_dim % num_heads:
                raise ValueError(
                    f"query_dim={query_dim} is not divisible by num_heads={num_heads}; "
                    "pass head_dim explicitly"
                )
            head_dim = query_dim // num_heads
        for name, val in (("head_dim", head_dim), ("out_dim", out_dim),
                          ("max_query_len", max_query_len), ("max_context_len", max_context_len)):
            check_positive_int(name, val, optional=True)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.query_dim, self.context_dim = query_dim, context_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.out_dim = query_dim if out_dim is None else out_dim
        self.dropout = dropout
        self.max_query_len, self.max_context_len = max_query_len, max_context_len
        inner = num_heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, self.out_dim)

    def _check(self, x: Tensor, context: Tensor, key_padding_mask: Tensor | None) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.query_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, Lq, {self.query_dim}), got {shape}")
        if (not isinstance(context, Tensor) or context.dim() != 3
                or context.shape[-1] != self.context_dim):
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context must have shape (B, Lk, {self.context_dim}), got {shape}")
        if x.shape[0] != context.shape[0]:
            raise ValueError(
                f"x and context batch sizes differ: {x.shape[0]} and {context.shape[0]}"
            )
        if self.max_query_len is not None and x.shape[1] > self.max_query_len:
            raise ValueError(f"query length {x.shape[1]} exceeds max_query_len="
                             f"{self.max_query_len}")
        if self.max_context_len is not None and context.shape[1] > self.max_context_len:
            raise ValueError(f"context length {context.shape[1]} exceeds max_context_len="
                             f"{self.max_context_len}")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor (True = padding)")
            if tuple(key_padding_mask.shape) != tuple(context.shape[:2]):
                raise ValueError(
                    f"key_padding_mask must have shape (B, Lk) = {tuple(context.shape[:2])}, "
                    f"got {tuple(key_padding_mask.shape)}"
                )

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        context_mask: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        score_mod: Callable[..., Tensor] | None = None,
        low_rank_bias: tuple[Tensor, Tensor] | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``x (B, Lq, query_dim)`` over ``context (B, Lk, context_dim)``.

        Args:
            key_padding_mask: optional ``(B, Lk)`` bool, True at padded context positions
                (torch's convention); they get no weight (a query whose context is all padding
                outputs the output projection's bias).
            context_mask: deprecated (removed in the next release): the inverse of
                ``key_padding_mask``, True for real context positions.
            score_mod: passed to :func:`attnkit.attention`: ``score_mod(score, b, h, q_idx,
                k_idx) -> score`` (e.g. a learned position prior); differentiable.
            low_rank_bias: optional ``(qe (B, H, Lq, E), ke (B, H, Lk, E))``: adds
                ``qe @ ke^T`` to the logits without ever forming the ``Lq x Lk`` bias (the
                factors ride along as extra query/key channels, so dense calls keep the fused
                SDPA path).
            return_weights: also return the ``(B, H, Lq, Lk)`` attention weights.

        Returns:
            ``(B, Lq, out_dim)``, or ``(out, weights)``.
        """
        if context_mask is not None:
            warnings.warn("CrossAttention(context_mask=...) (True = real position) is "
                          "deprecated; pass key_padding_mask=~context_mask (True = padding, "
                          "torch's convention)", DeprecationWarning, stacklevel=2)
            if key_padding_mask is not None:
                raise ValueError("pass key_padding_mask or context_mask, not both")
            if not isinstance(context_mask, Tensor) or context_mask.dtype != torch.bool:
                raise TypeError("context_mask must be a bool tensor (True = real frame)")
            key_padding_mask = ~context_mask
        self._check(x, context, key_padding_mask)
        B, lq, _ = x.shape
        lk = context.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.to_q(x).view(B, lq, h, d).transpose(1, 2)
        k, v = self.to_kv(context).view(B, lk, 2, h, d).permute(2, 0, 3, 1, 4)
        # the engine's boolean bias is a keep-mask (as SDPA's attn_mask)
        keep = None if key_padding_mask is None else ~key_padding_mask.view(B, 1, 1, lk)
        scale = None
        if low_rank_bias is not None:
            qe, ke = low_rank_bias
            if (qe.dim() != 4 or ke.dim() != 4 or tuple(qe.shape[:3]) != (B, h, lq)
                    or tuple(ke.shape[:3]) != (B, h, lk) or qe.shape[3] != ke.shape[3]):
                raise ValueError(
                    f"low_rank_bias must be (qe (B, H, Lq, E), ke (B, H, Lk, E)) with "
                    f"(B, H, Lq, Lk) = {(B, h, lq, lk)}, got {tuple(qe.shape)}, "
                    f"{tuple(ke.shape)}"
                )
            # (q/sqrt(d), qe) . (k, ke) = q.k/sqrt(d) + qe.ke : the scale moves into q
            q = torch.cat([q * d**-0.5, qe.to(q.dtype)], -1)
            k = torch.cat([k, ke.to(k.dtype)], -1)
            scale = 1.0
        res = attention(q, k, v, bias=keep, score_mod=score_mod, scale=scale,
                        return_weights=return_weights,
                        dropout_p=self.dropout if self.training else 0.0)
        out, weights = res if return_weights else (res, None)
        out = self.to_out(out.transpose(1, 2).reshape(B, lq, h * d))
        return (out, weights) if return_weights else out
