"""Multi-head, grouped-query and multi-query self-attention with rotary positions and KV caches.

One module covers the three variants through ``num_kv_heads``: ``num_heads`` (multi-head, the
default), a divisor in between (grouped-query) or ``1`` (multi-query). Query head ``h`` reads
key/value head ``h // (num_heads // num_kv_heads)``: the engine broadcasts shared heads without
copying them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive_int
from ..functional import SparseWeights, attention
from ..kernels import native
from ..patterns import Pattern

__all__ = ["RotaryEmbedding", "SelfAttention", "SplitLinear", "attention_layers", "split_linear"]

# A decoding step multiplies one token by every weight matrix: matrix-vector products limited by
# memory bandwidth. F.linear hands them to a BLAS GEMV that reads the weight on one thread
# (~15 GB/s measured here for fp32 with MKL at 2 threads). Without autograd, fp32 goes to the
# native GEMV (kernels/gemv_cpu.c: each thread streams its block of rows); otherwise one batched
# product over blocks of output features, a block per thread, reads it on all threads (~22-30
# GB/s). Below ~1 MB of weight the threads' start-up costs more than it saves (measured), so
# small layers stay plain.
SPLIT_MAX_ROWS = 4  # rows (tokens x batch) up to which split_linear splits; above: F.linear
SPLIT_MIN_NUMEL = 1 << 18  # smallest weight (elements) that split_linear splits
NATIVE_MIN_NUMEL = 1 << 14  # smallest weight for the native GEMV (its thread start-up is cheap)
_MKL = torch.backends.mkl.is_available()
_SPLIT_DTYPES = (torch.float32, torch.float64)


def _split_parts(x: Tensor, weight: Tensor) -> int:
    """How many output blocks :func:`split_linear` uses for ``x @ weight.T`` (1: plain)."""
    threads = torch.get_num_threads()
    if (threads < 2 or not _MKL or weight.dim() != 2 or weight.numel() < SPLIT_MIN_NUMEL
            or x.dim() < 1 or x.shape[-1] != weight.shape[1]
            or not 0 < x.numel() <= SPLIT_MAX_ROWS * weight.shape[1]
            or x.dtype not in _SPLIT_DTYPES or weight.dtype != x.dtype
            or x.device.type != "cpu" or not weight.is_contiguous()):
        return 1
    return _largest_divisor(weight.shape[0], threads)


def _largest_divisor(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is at most ``cap`` (at least 1)."""
    for parts in range(min(cap, n), 1, -1):
        if n % parts == 0:
            return parts
    return 1


def _native_ok(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`split_linear` can use the native GEMV (fp32 CPU, few rows, no autograd)."""
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.numel() >= NATIVE_MIN_NUMEL and x.device.type == "cpu"
            and weight.device.type == "cpu" and weight.is_contiguous()
            and x.dim() >= 1 and x.shape[-1] == weight.shape[1]
            and 0 < x.numel() <= native.GEMV_MAX_ROWS * weight.shape[1]
            and (bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1]
                                  and bias.device.type == "cpu"))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and native.gemv_available())


def split_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                 gelu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)`` (then ``F.gelu`` with ``gelu=True``), faster for the few
    rows of a decoding step.

    ``x (..., in)``, ``weight (out, in)``, ``bias (out,)`` -> ``(..., out)``. Without autograd,
    fp32 on CPU with at most ``GEMV_MAX_ROWS`` rows goes to the native GEMV kernel
    (:func:`attnkit.kernels.native.gemv_rows`: each thread streams its own block of the weight's
    rows) when it is available. Otherwise, with at most :data:`SPLIT_MAX_ROWS` rows, a weight
    of at least :data:`SPLIT_MIN_NUMEL` elements, fp32/fp64 on CPU with MKL and two or more
    threads, the output features are cut into ``P`` blocks (``P`` = threads, or the largest
    smaller divisor of ``out``) computed by one ``baddbmm`` over views of ``weight`` (no copy),
    so the weight is read by all threads at once; else it is ``F.linear``. Same result up to
    floating-point rounding; differentiable except on the native path (taken only without
    autograd).
    """
    if _native_ok(x, weight, bias):
        # checked above; GELU fused into the same pass
        return native.gemv_multi(x, (weight,), (bias,), gelu=gelu, check=False)
    parts = _split_parts(x, weight)
    if parts < 2:
        y = F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    xs = x.reshape(1, rows, in_features).expand(parts, rows, in_features)
    ws = weight.view(parts, out_features // parts, in_features).transpose(1, 2)
    if bias is None:
        y = torch.bmm(xs, ws)
    else:
        y = torch.baddbmm(bias.view(parts, 1, out_features // parts), xs, ws)
    if rows == 1:  # (P, 1, out/P) is already the (1, out) row
        y = y.view(*x.shape[:-1], out_features)
    else:
        y = y.transpose(0, 1).reshape(*x.shape[:-1], out_features)
    return F.gelu(y) if gelu else y


class SplitLinear(nn.Linear):
    """:class:`torch.nn.Linear` whose forward is :func:`split_linear` (faster matrix-vector
    products when decoding one token). Same parameters, state dict and hooks as ``nn.Linear``."""

    def forward(self, x: Tensor) -> Tensor:
        return split_linear(x, self.weight, self.bias)


def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x (..., L, D)`` and tables ``(L, R)``:
    rotate_half(x) = cat(-x2, x1); swapping the halves gives cat(x2, x1) (one flip of a
    ``(..., 2, R/2)`` view, fewer kernels than ``torch.roll``), its sign is in ``signed_sin``.
    With ``R < D`` only the first ``R`` channels rotate; the rest pass through."""
    d, r = x.shape[-1], cos.shape[-1]
    if r < d:
        return torch.cat([_rotate(x[..., :r], cos, signed_sin), x[..., r:]], dim=-1)
    swapped = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, signed_sin)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (RoFormer), "rotate-half" layout as in Llama.

    Channel pairs ``(i, i + R/2)`` of a head are rotated by ``position * base**(-2i/R)``, for
    the first ``R = rotary_dims`` channels (default all ``head_dim``; fewer leaves the rest
    unrotated, so content can match across long distances without phase drift). The rotation
    depends on the absolute position only, so a token rotated alone at position ``p`` (a cached
    decoding step with ``offset=p``) equals the same token inside a full sequence.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, *, rotary_dims: int | None = None):
        super().__init__()
        check_positive_int("head_dim", head_dim)
        r = head_dim if rotary_dims is None else rotary_dims
        if isinstance(r, bool) or not isinstance(r, int) or r < 2 or r % 2 or r > head_dim:
            raise ValueError(f"rotary_dims must be an even int in [2, head_dim={head_dim}] "
                             f"(head_dim itself even when rotary_dims is not given), got {r!r}")
        if (isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1.0
                or not math.isfinite(base)):
            raise ValueError(f"base must be a finite float > 1, got {base!r}")
        self.head_dim, self.rotary_dims, self.base = head_dim, r, float(base)
        # Frequencies stay float64 (not a buffer) so module dtype casts cannot round them.
        self.inv_freq = base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
        # cos and signed sin (see _rotate) for positions [0, n); named apart from the earlier
        # unsigned `_table` so a module pickled by an older version rebuilds it.
        self._signed_table: tuple[Tensor, Tensor] | None = None

    def tables(self, start: int, end: int, device, dtype) -> tuple[Tensor, Tensor]:
        """``(cos, signed_sin)``, each ``(end - start, rotary_dims)``, for positions
        ``start..end-1``, computed afresh (not kept): for callers that share one table between
        layers (see :meth:`SelfAttention.qkv`). Angles in float64, so positions in the
        millions keep their phase."""
        pos = torch.arange(start, end, dtype=torch.float64, device=device)
        angles = torch.outer(pos, self.inv_freq.to(device=device, dtype=torch.float64))
        return (torch.cat([angles, angles], dim=-1).cos().to(dtype),
                torch.cat([-angles.sin(), angles.sin()], dim=-1).to(dtype))

    def cos_sin(self, start: int, end: int, device, dtype) -> tuple[Tensor, Tensor]:
        """:meth:`tables` for positions ``start..end-1``, sliced from a table kept on the
        module (grown geometrically, so step-by-step decoding does not rebuild it): views, do
        not modify them."""
        table = getattr(self, "_signed_table", None)
        if (table is None or table[0].shape[0] < end or table[0].device != torch.device(device)
                or table[0].dtype != dtype):
            # Angles in float64, stored in the working dtype; grown geometrically so step-by-step
            # decoding does not rebuild the table each time.
            n = max(end, 2 * (0 if table is None else table[0].shape[0]), 64)
            # sin with the sign of rotate-half folded in: rotate_half(x) * sin equals
            # roll(x, D/2) * cat(-sin, sin), one kernel fewer per call.
            table = self.tables(0, n, device, dtype)
            self._signed_table = table
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
        return _rotate(x, *self.cos_sin(offset, offset + length, x.device, x.dtype))


def attention_layers(model: nn.Module) -> list[SelfAttention]:
    """The :class:`SelfAttention` modules of ``model`` in module order (``model.modules()``):
    the layer numbering of the model-agnostic tools (:mod:`attnkit.pruning`,
    :mod:`attnkit.flops`) and of :mod:`attnkit.lm`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, SelfAttention)]
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no attnkit.nn.SelfAttention layers")
    return layers


class SelfAttention(nn.Module):
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
        rotary_dims: rotate only the first ``rotary_dims`` channels of each head (even; default
            all of them; 0 = no rotation), see :class:`RotaryEmbedding`.
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
        rotary_dims: int | None = None,
        layer_idx: int = 0,
    ):
        super().__init__()
        for name, val in (("dim", dim), ("num_heads", num_heads)):
            check_positive_int(name, val)
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}"
            )
        if pattern is not None and not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be None or a Pattern, got {type(pattern).__name__}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be an int >= 0, got {layer_idx!r}")
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.pattern, self.dropout, self.layer_idx = pattern, float(dropout), layer_idx
        hd = self.head_dim
        self.q_proj = SplitLinear(dim, num_heads * hd, bias=qkv_bias)
        self.k_proj = SplitLinear(dim, num_kv_heads * hd, bias=qkv_bias)
        self.v_proj = SplitLinear(dim, num_kv_heads * hd, bias=qkv_bias)
        self.out_proj = SplitLinear(num_heads * hd, dim)
        self.rotary = (RotaryEmbedding(hd, rotary_dims=rotary_dims)
                       if rope and rotary_dims != 0 else None)

    def qkv(self, x: Tensor, offset: int = 0, *,
            rope_tables: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The heads of ``x (B, L, dim)``: ``q (B, num_heads, L, head_dim)``, ``k`` and ``v``
        ``(B, num_kv_heads, L, head_dim)``, queries and keys rotated for positions
        ``offset..offset+L-1``, or by ``rope_tables`` (``(cos, signed_sin)`` rows for these
        positions from :meth:`RotaryEmbedding.tables`) when given. For models that call the
        engine themselves (custom biases, sequence parallelism, streaming)."""
        b, length, _ = x.shape
        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(b, length, h, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, length, hkv, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, length, hkv, hd).transpose(1, 2)
        if self.rotary is not None:  # one table lookup for q and k
            if rope_tables is None:
                rope_tables = self.rotary.cos_sin(offset, offset + length, q.device, q.dtype)
            q, k = _rotate(q, *rope_tables), _rotate(k, *rope_tables)
        return q, k, v

    def merge(self, heads: Tensor) -> Tensor:
        """``out_proj`` of the heads' outputs ``(B, num_heads, L, head_dim)`` -> ``(B, L, dim)``."""
        b, h, length, hd = heads.shape
        return self.out_proj(heads.transpose(1, 2).reshape(b, length, h * hd))

    def forward(
        self,
        x: Tensor,
        *,
        cache=None,
        need_weights: bool = False,
        head_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor | SparseWeights]:
        """Attend ``x (B, L, dim)`` to itself (and to the cached past).

        Args:
            cache: an :class:`attnkit.lm.KVCache`. The new keys/values are appended to slot
                ``layer_idx``; ``x`` holds the positions after the cached ones, and rotary
                angles use those absolute positions.
            need_weights: also return the attention weights from the engine: ``(B, H, L, Lk)``
                for dense patterns, :class:`attnkit.SparseWeights` otherwise.
            head_mask: ``(num_heads,)`` multipliers of each head's output before ``out_proj``
                (a gate for head-importance scores: its gradient is each head's importance;
                zero prunes a head without changing the weights).
            key_padding_mask: ``(B, S)`` bool, ``True`` = padding (torch's convention), over
                every position so far, ``S = cached + L``: padded keys are never attended to.
                Queries at padded positions see no key and give zeros (their outputs mean
                nothing).

        Returns:
            ``(B, L, dim)``, or ``(out, weights)``.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, L, {self.dim}), got {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError("x must hold at least one position (L >= 1)")
        offset = 0 if cache is None else cache.seq_length(self.layer_idx)
        q, k, v = self.qkv(x, offset)
        heads, weights = self.attend(q, k, v, cache=cache, need_weights=need_weights,
                                     head_mask=head_mask, key_padding_mask=key_padding_mask)
        out = self.out_proj(heads)
        return (out, weights) if need_weights else out

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        cache=None,
        need_weights: bool = False,
        head_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | SparseWeights | None]:
        """Everything between the projections and ``out_proj``, for callers that compute
        the projections themselves (e.g. the fused decoding step of :mod:`attnkit.lm`).

        Args:
            q: ``(B, num_heads, L, head_dim)``, k, v: ``(B, num_kv_heads, L, head_dim)``: the
                new positions' heads, queries and keys already rotated (see :meth:`qkv`).
            cache, need_weights, head_mask, key_padding_mask: as in :meth:`forward`.

        Returns:
            The heads' outputs ``(B, L, num_heads * head_dim)`` (the input of ``out_proj``)
            and the weights (``None`` without ``need_weights``).
        """
        b, h, length, hd = q.shape
        hkv = self.num_kv_heads
        offset = 0 if cache is None else cache.seq_length(self.layer_idx)
        pattern = self.pattern
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
            pattern = cache.attention_pattern(pattern, length, k.shape[2])
        keep = self._key_keep_mask(key_padding_mask, b, offset + length, k.shape[2])
        dropout_p = self.dropout if self.training else 0.0
        parts = 0 if keep is not None else self._fold_parts(pattern, length, need_weights,
                                                              dropout_p)
        if parts:
            # One query per head attending to every key (a cached decoding step): the g = h/hkv
            # query heads sharing a key/value head become g query rows of that head, in
            # `parts` blocks (one per thread), so each thread reads the shared keys once
            # instead of once per query head. The same attention, another layout.
            g = h // hkv
            qf = q.reshape(b, hkv * parts, g // parts, hd)
            out = attention(qf, k, v).reshape(b, h, 1, v.shape[-1])
            weights = None
        else:
            result = attention(q, k, v, pattern=pattern, bias=keep, dropout_p=dropout_p,
                               return_weights=need_weights)
            out, weights = result if need_weights else (result, None)
        if head_mask is not None:
            if head_mask.shape != (h,):
                raise ValueError(
                    f"head_mask must have shape (num_heads,) = ({h},), got "
                    f"{tuple(head_mask.shape)}"
                )
            out = out * head_mask.to(out.dtype).view(1, h, 1, 1)
        return out.transpose(1, 2).reshape(b, length, h * out.shape[-1]), weights

    @staticmethod
    def _key_keep_mask(key_padding_mask: Tensor | None, batch: int, positions: int,
                       lk: int) -> Tensor | None:
        """The engine's keep-mask ``(B, 1, 1, Lk)`` for the ``lk`` attended keys (the last
        ``lk`` of ``positions``), or None when nothing is padded."""
        if key_padding_mask is None:
            return None
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = padding)")
        if key_padding_mask.shape != (batch, positions):
            raise ValueError(
                f"key_padding_mask must have shape (B, cached + L) = ({batch}, {positions}), "
                f"got {tuple(key_padding_mask.shape)}"
            )
        pad = key_padding_mask[:, positions - lk:]
        if not bool(pad.any()):
            return None
        return (~pad).view(batch, 1, 1, lk)

    def _fold_parts(self, pattern: Pattern | None, length: int, need_weights: bool,
                    dropout_p: float) -> int:
        """Blocks of query heads per key/value head for a single unmasked query (0: no fold)."""
        g = self.num_heads // self.num_kv_heads
        if pattern is not None or length != 1 or need_weights or dropout_p or g == 1:
            return 0
        return _largest_divisor(g, torch.get_num_threads() // self.num_kv_heads)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, pattern={self.pattern!r}, "
            f"rope={self.rotary is not None}"
            + ("" if self.rotary is None  # modules pickled before rotary_dims rotate all
               or getattr(self.rotary, "rotary_dims", self.head_dim) == self.head_dim
               else f", rotary_dims={self.rotary.rotary_dims}")
            + f", layer_idx={self.layer_idx}"
        )
