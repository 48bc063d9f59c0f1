"""A drop-in for :class:`torch.nn.MultiheadAttention` that computes through
:func:`attnkit.attention`.

Same constructor, parameters (a torch ``state_dict`` loads unchanged), ``forward`` signature,
mask conventions and ``(out, weights)`` results as torch, plus attnkit's ``pattern=`` (restrict
each query to a pattern's keys, never forming the ``L x S`` scores for a sparse pattern when no
dense mask or weights are asked for) and ``num_kv_heads=`` (grouped-/multi-query attention).

Mask convention (torch's, used by every attnkit layer): a boolean ``key_padding_mask`` or
``attn_mask`` is True where a key is *masked out*; a float mask is added to the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive_int
from ..functional import SparseWeights, attention
from ..patterns import Pattern, causal

__all__ = ["MultiheadAttention"]


def _additive(mask: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """A torch-convention mask as additive logits: bool True -> ``-inf``, float as is."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    if not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask.to(dtype)


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` on the attnkit engine.

    Args:
        embed_dim: model width ``E`` (queries' features and output features).
        num_heads: query heads; ``E % num_heads == 0``, ``head_dim = E // num_heads``.
        dropout: dropout on the attention weights (training only).
        bias: biases on the input and output projections.
        add_bias_kv: append a learned key and value (``bias_k``, ``bias_v``) to every sequence.
        add_zero_attn: append an all-zero key and value to every sequence.
        kdim, vdim: features of ``key`` / ``value`` (default ``E``). When either differs from
            ``E`` (or with ``num_kv_heads``), the projections are ``q_proj_weight``,
            ``k_proj_weight`` and ``v_proj_weight``; otherwise one packed ``in_proj_weight``.
        batch_first: inputs and outputs are ``(N, L, E)`` instead of ``(L, N, E)``.
        device, dtype: of the parameters.
        pattern: attnkit extension: an :mod:`attnkit.patterns` pattern over (query, key)
            positions that every query is restricted to (combined with the masks), e.g.
            ``sliding_window(64) | global_tokens([0])``. Not with ``add_bias_kv`` /
            ``add_zero_attn`` (their extra key has no position).
        num_kv_heads: attnkit extension: key/value heads shared by the query heads (a divisor
            of ``num_heads``; grouped-query, or multi-query with 1). Default ``num_heads``
            (then the parameters are torch's exactly).

    Parameters: ``in_proj_weight (E + 2 Hkv d, E)`` or ``q_proj_weight (E, E)``,
    ``k_proj_weight (Hkv d, kdim)``, ``v_proj_weight (Hkv d, vdim)``; ``in_proj_bias
    (E + 2 Hkv d,)``; ``out_proj`` (``Linear(E, E)``); ``bias_k``, ``bias_v`` ``(1, 1, Hkv d)``.
    """

    __constants__ = ["batch_first"]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        pattern: Pattern | None = None,
        num_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            check_positive_int(name, val)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        for name, val in (("kdim", kdim), ("vdim", vdim)):
            check_positive_int(name, val, optional=True)
        hkv = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(hkv, bool) or not isinstance(hkv, int) or hkv < 1 or num_heads % hkv:
            raise ValueError(
                f"num_kv_heads must be a positive int dividing num_heads={num_heads}, "
                f"got {num_kv_heads!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if pattern is not None and not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be None or a Pattern, got {type(pattern).__name__}")
        if pattern is not None and (add_bias_kv or add_zero_attn):
            raise ValueError("pattern cannot be combined with add_bias_kv or add_zero_attn "
                             "(their extra key has no position in the pattern)")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.kdim, self.vdim = embed_dim, kdim, vdim
        self.num_heads, self.num_kv_heads = num_heads, hkv
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self.pattern = pattern
        kv_out = hkv * self.head_dim
        self._qkv_same_embed_dim = kdim == embed_dim and vdim == embed_dim and hkv == num_heads
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_out, kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_out, vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * kv_out, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, kv_out, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, kv_out, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = bool(add_zero_attn)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's initialisation: Xavier-uniform projections, zero biases."""
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
        """``(N, L, E)``, ``(N, S, kdim)``, ``(N, S, vdim)`` -> q, k, v ``(N, L|S, H|Hkv * d)``."""
        e, kv_out = self.embed_dim, self.num_kv_heads * self.head_dim
        b = self.in_proj_bias
        bq, bk, bv = (None,) * 3 if b is None else b.split((e, kv_out, kv_out))
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if key is query and value is key:  # self-attention: one product
                return F.linear(query, w, b).split((e, kv_out, kv_out), dim=-1)
            wq, wk, wv = w.split((e, kv_out, kv_out))
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _check(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask, attn_mask
               ) -> bool:
        """Validate shapes as torch does; returns whether the inputs are batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "query, key, value must all be 3-D (batched: (L, N, E), or (N, L, E) with "
                "batch_first) or all 2-D (unbatched: (L, E)), got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        for name, t, feat in (("query", query, self.embed_dim), ("key", key, self.kdim),
                              ("value", value, self.vdim)):
            if t.shape[-1] != feat:
                raise ValueError(f"{name} must have {feat} features (last dim), got shape "
                                 f"{tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must agree in all but the last dim, got "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        if key_padding_mask is not None:
            want = 2 if batched else 1
            if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dim() != want:
                raise ValueError(
                    f"key_padding_mask must be a {want}-D tensor ((N, S) batched, (S,) "
                    f"unbatched), got {getattr(key_padding_mask, 'shape', key_padding_mask)}")
        if attn_mask is not None:
            if not isinstance(attn_mask, Tensor) or attn_mask.dim() not in (2, 3):
                raise ValueError("attn_mask must be a 2-D (L, S) or 3-D (N * num_heads, L, S) "
                                 "tensor")
        return batched

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` over ``key`` / ``value``, exactly as torch's layer.

        Args:
            query: ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``) or unbatched ``(L, E)``.
            key, value: ``(S, N, kdim)`` / ``(S, N, vdim)`` (batch first likewise) or ``(S, .)``.
            key_padding_mask: ``(N, S)`` (or ``(S,)`` unbatched); bool True = padding (ignored
                key), or float added to the logits.
            need_weights: also return the attention weights.
            attn_mask: ``(L, S)`` or ``(N * num_heads, L, S)``; bool True = not allowed, or
                float added to the logits.
            average_attn_weights: average the returned weights over heads.
            is_causal: a hint that ``attn_mask`` is the causal mask; without ``attn_mask``
                (where torch raises) the causal mask is applied (``L == S`` only).

        Returns:
            ``(out, weights)``: ``out`` shaped like ``query`` with ``E`` features; ``weights``
            ``(N, L, S)`` (``(N, num_heads, L, S)`` with ``average_attn_weights=False``, no
            ``N`` when unbatched), or ``None`` when ``need_weights=False``. A query with no
            allowed key outputs zeros before ``out_proj`` (and zero weights) where torch gives
            NaN.
        """
        batched = self._check(query, key, value, key_padding_mask, attn_mask)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            # keep the identity of shared inputs so self-attention projects once
            same_kv, same_qk = value is key, key is query
            query = query.transpose(0, 1)
            key = query if same_qk else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
        n, lq, _ = query.shape
        s = key.shape[1]
        if key.shape[0] != n:
            raise ValueError(f"query and key batch sizes differ: {n} and {key.shape[0]}")
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim

        q, k, v = self._project(query, key, value)
        dtype = q.dtype
        bias = None
        if attn_mask is not None:
            want = [(lq, s), (n * h, lq, s)][attn_mask.dim() - 2]
            if tuple(attn_mask.shape) != want:
                raise ValueError(f"attn_mask must have shape {want}, got "
                                 f"{tuple(attn_mask.shape)}")
            bias = _additive(attn_mask, "attn_mask", dtype)
            if bias.dim() == 3:
                bias = bias.view(n, h, lq, s)
        pattern = self.pattern
        if is_causal and attn_mask is None:
            if lq != s:
                raise ValueError(f"is_causal without attn_mask needs L == S, got L={lq}, S={s}")
            pattern = causal() if pattern is None else pattern & causal()
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (n, s):
                raise ValueError(f"key_padding_mask must have shape (N, S) = {(n, s)}, got "
                                 f"{tuple(key_padding_mask.shape)}")
            pad = _additive(key_padding_mask, "key_padding_mask", dtype).view(n, 1, 1, s)
            bias = pad if bias is None else bias + pad
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, -1)], 1)
            v = torch.cat([v, self.bias_v.expand(n, 1, -1)], 1)
            s += 1
            if bias is not None:
                bias = F.pad(bias, (0, 1))
        q = q.view(n, lq, h, d).transpose(1, 2)
        k = k.view(n, s, hkv, d).transpose(1, 2)
        v = v.view(n, s, hkv, d).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, hkv, 1, d)], 2)
            v = torch.cat([v, v.new_zeros(n, hkv, 1, d)], 2)
            s += 1
            if bias is not None:
                bias = F.pad(bias, (0, 1))
        dropout_p = self.dropout if self.training else 0.0
        res = attention(q, k, v, pattern=pattern, bias=bias, dropout_p=dropout_p,
                        return_weights=need_weights)
        out, weights = res if need_weights else (res, None)
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, self.embed_dim))
        if isinstance(weights, SparseWeights):
            weights = weights.to_dense()
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        extra = "" if self.pattern is None else f", pattern={self.pattern!r}"
        if self.num_kv_heads != self.num_heads:
            extra += f", num_kv_heads={self.num_kv_heads}"
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"batch_first={self.batch_first}{extra}")
