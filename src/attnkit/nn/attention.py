"""Multi-head, grouped-query and multi-query self-attention with rotary positions and KV caches.

One module covers the three variants through ``num_kv_heads``: ``num_heads`` (multi-head, the
default), a divisor in between (grouped-query) or ``1`` (multi-query). Query head ``h`` reads
key/value head ``h // (num_heads // num_kv_heads)``: the engine broadcasts shared heads without
copying them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..functional import SparseWeights, attention
from ..patterns import Pattern

__all__ = ["RotaryEmbedding", "MultiheadAttention"]


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (RoFormer), "rotate-half" layout as in Llama.

    Channel pairs ``(i, i + D/2)`` of a head are rotated by ``position * base**(-2i/D)``. The
    rotation depends on the absolute position only, so a token rotated alone at position ``p``
    (a cached decoding step with ``offset=p``) equals the same token inside a full sequence.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be an even int >= 2, got {head_dim!r}")
        if not base > 1.0:
            raise ValueError(f"base must be > 1, got {base}")
        self.head_dim, self.base = head_dim, float(base)
        # Frequencies stay float64 (not a buffer) so module dtype casts cannot round them.
        self.inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self._table: tuple[Tensor, Tensor] | None = None  # cos, sin for positions [0, n)

    def _cos_sin(self, start: int, end: int, device, dtype) -> tuple[Tensor, Tensor]:
        table = self._table
        if (table is None or table[0].shape[0] < end or table[0].device != torch.device(device)
                or table[0].dtype != dtype):
            # Angles in float64, stored in the working dtype; grown geometrically so step-by-step
            # decoding does not rebuild the table each time.
            n = max(end, 2 * (0 if table is None else table[0].shape[0]), 64)
            pos = torch.arange(n, dtype=torch.float64, device=device)
            angles = torch.outer(pos, self.inv_freq.to(device=device, dtype=torch.float64))
            angles = torch.cat([angles, angles], dim=-1)
            table = (angles.cos().to(dtype), angles.sin().to(dtype))
            self._table = table
        return table[0][start:end], table[1][start:end]

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """Rotate ``x (B, H, L, D)`` whose tokens sit at positions ``offset .. offset + L - 1``."""
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"x must have shape (B, H, L, {self.head_dim}), got {tuple(x.shape)}"
            )
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        length = x.shape[2]
        cos, sin = self._cos_sin(offset, offset + length, x.device, x.dtype)
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


class MultiheadAttention(nn.Module):
    """Self-attention with ``num_heads`` query heads sharing ``num_kv_heads`` key/value heads.

    Args:
        dim: model width; ``dim % num_heads == 0`` and ``head_dim = dim // num_heads``.
        num_heads: query heads.
        num_kv_heads: key/value heads (default ``num_heads``); must divide ``num_heads``.
        pattern: an :mod:`attnkit.patterns` pattern over (query, key) positions, e.g.
            ``causal()`` for a language model, or ``None`` for full attention.
        qkv_bias: biases on the q/k/v projections.
        dropout: dropout on the attention weights (training only).
        rope: apply rotary position embeddings to queries and keys.
        layer_idx: which layer's slot this module uses in a multi-layer KV cache.

    Layers: ``q_proj (dim -> num_heads*head_dim)``, ``k_proj`` and ``v_proj``
    (``dim -> num_kv_heads*head_dim``) and ``out_proj (num_heads*head_dim -> dim)``. Head ``h``
    owns rows ``h*head_dim:(h+1)*head_dim`` of ``q_proj`` and the same columns of ``out_proj``,
    so heads can be pruned by slicing these weights (and updating ``num_heads``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        pattern: Pattern | None = None,
        qkv_bias: bool = False,
        dropout: float = 0.0,
        rope: bool = True,
        *,
        layer_idx: int = 0,
    ):
        super().__init__()
        for name, val in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
            raise ValueError(f"num_kv_heads must be a positive int, got {num_kv_heads!r}")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}"
            )
        if pattern is not None and not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be None or a Pattern, got {type(pattern).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.pattern, self.dropout, self.layer_idx = pattern, float(dropout), layer_idx
        hd = self.head_dim
        self.q_proj = nn.Linear(dim, num_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * hd, bias=qkv_bias)
        self.out_proj = nn.Linear(num_heads * hd, dim)
        self.rotary = RotaryEmbedding(hd) if rope else None

    def forward(
        self,
        x: Tensor,
        *,
        cache=None,
        need_weights: bool = False,
        head_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor | SparseWeights]:
        """Attend ``x (B, L, dim)`` to itself (and to the cached past).

        Args:
            cache: an :class:`attnkit.cache.KVCache`. The new keys/values are appended to slot
                ``layer_idx``; ``x`` holds the positions after the cached ones, and rotary
                angles use those absolute positions.
            need_weights: also return the attention weights from the engine: ``(B, H, L, Lk)``
                for dense patterns, :class:`attnkit.SparseWeights` otherwise.
            head_mask: ``(num_heads,)`` multipliers of each head's output before ``out_proj``
                (a gate for head-importance scores: its gradient is each head's importance;
                zero prunes a head without changing the weights).

        Returns:
            ``(B, L, dim)``, or ``(out, weights)``.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, L, {self.dim}), got {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError("x must hold at least one position (L >= 1)")
        b, length, _ = x.shape
        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(b, length, h, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, length, hkv, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, length, hkv, hd).transpose(1, 2)
        offset = 0 if cache is None else cache.seq_length(self.layer_idx)
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        pattern = self.pattern
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
            pattern = cache.attention_pattern(pattern, length, k.shape[2])
        result = attention(
            q, k, v, pattern=pattern, dropout_p=self.dropout if self.training else 0.0,
            return_weights=need_weights,
        )
        out, weights = result if need_weights else (result, None)
        if head_mask is not None:
            if head_mask.shape != (h,):
                raise ValueError(
                    f"head_mask must have shape (num_heads,) = ({h},), got "
                    f"{tuple(head_mask.shape)}"
                )
            out = out * head_mask.to(out.dtype).view(1, h, 1, 1)
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, h * hd))
        return (out, weights) if need_weights else out

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, pattern={self.pattern!r}, "
            f"rope={self.rotary is not None}, layer_idx={self.layer_idx}"
        )
