"""The attention engine: one exact, structure-aware scaled dot-product attention.

``attention(q, k, v, pattern=..., bias=..., score_mod=..., temperature=..., return_weights=...)``
equals dense softmax attention restricted to the pattern's allowed pairs, trains on any device,
and never forms an ``Lq x Lk`` tensor for a sparse pattern (forward or backward).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import native
from .kernels.components import AllKeys, MaskTerm, Ranges
from .kernels.enumerate import pair_weights, weights_sink
from .kernels.short import short_attention, short_ok
from .kernels.structured import (
    NEG_INF,
    Ctx,
    finish_scores,
    index_dtype,
    lower,
    scale_in_kernel,
    softmax_rows,
    structured_attention,
)
from .patterns import Causal, Pattern

__all__ = ["attention", "SparseWeights", "dense_reference"]

# enable_gqa arrived in torch 2.5; SDPA is a builtin without an inspectable signature.
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
# Decoding steps (a few query rows per key/value head against a long cache) go to the native
# split-K kernel instead of SDPA on CPU: SDPA's CPU kernel gives each thread whole heads, so
# with one key/value head (multi-query) one thread reads the cache while the other idles, and its
# block layout reads the cache slowly when it is not in cache (as after a step's weight reads).
# Measured in a decoding step at 2048 keys: ~2x faster (bench_decoding --case roofline).
DECODE_MAX_ROWS = 16
DECODE_MIN_KEYS = 512


class SparseWeights:
    """Attention weights of a sparse pattern in CSR form.

    Attributes:
        indptr: ``(Lq + 1,)`` row pointers; ``indices``: ``(nnz,)`` key index of each entry.
            Both int32 where every entry fits (``nnz`` and ``Lk`` below ``2**31``, as scipy
            chooses: less memory and less to write), else int64; ``.long()`` gives int64 for
            ops that need it (``scatter``, ``index_add_``).
        values: ``(B, Hq, nnz)`` weights (``(*batch, Hq, nnz)`` for several batch dims), rows
            summing to 1 (0 for rows with no key).
        shape: ``(Lq, Lk)``.
    """

    def __init__(self, indptr: Tensor, indices: Tensor, values: Tensor, shape: tuple[int, int]):
        self.indptr, self.indices, self.values, self.shape = indptr, indices, values, shape

    @property
    def rows(self) -> Tensor:
        """``(nnz,)`` query index of each entry."""
        counts = self.indptr[1:] - self.indptr[:-1]
        return torch.repeat_interleave(torch.arange(self.shape[0], device=counts.device), counts)

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def to_dense(self) -> Tensor:
        """``(B, Hq, Lq, Lk)`` dense weights (zeros off the pattern). For small sizes."""
        lead = self.values.shape[:-1]
        lq, lk = self.shape
        out = self.values.new_zeros(*lead, lq * lk)
        flat = self.rows * lk + self.indices
        return out.index_copy(-1, flat, self.values).view(*lead, lq, lk)

    def to_torch_sparse(self) -> Tensor:
        """The weights as a ``torch.sparse_csr`` tensor of shape ``(*lead, Lq, Lk)`` (lead =
        ``values.shape[:-1]``, e.g. ``(B, Hq)``; batched CSR shares one structure), so
        ``w.to_torch_sparse().to_dense()`` equals :meth:`to_dense`. Gradients flow to
        ``values``."""
        lead = tuple(self.values.shape[:-1])
        lq, lk = self.shape
        crow = self.indptr.to(self.values.device).expand(*lead, lq + 1)
        col = self.indices.to(self.values.device).expand(*lead, self.nnz)
        with warnings.catch_warnings():  # torch calls CSR support "beta"
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(crow, col, self.values, (*lead, lq, lk),
                                           check_invariants=False)

    def to_scipy(self, *index: int):
        """One ``(Lq, Lk)`` map as a ``scipy.sparse.csr_array`` (needs scipy: ``pip install
        attnkit[graph]``). ``index`` picks it among the leading dims, e.g. ``w.to_scipy(b, h)``;
        it may be left out when they are all of size 1. Values are detached, as float64 when
        the weights are float64, else float32."""
        lead = tuple(self.values.shape[:-1])
        if not index and all(d == 1 for d in lead):
            index = (0,) * len(lead)
        if len(index) != len(lead) or not all(
                isinstance(i, int) and not isinstance(i, bool) and -d <= i < d
                for i, d in zip(index, lead)):
            raise ValueError(f"index must pick one map among the leading dims {lead} "
                             f"(e.g. to_scipy(batch, head)), got {index}")
        try:
            import scipy.sparse as sp
        except ImportError as e:  # optional dependency
            raise ImportError("SparseWeights.to_scipy() needs scipy (pip install "
                              "attnkit[graph])") from e
        vals = self.values[index].detach().cpu()
        if vals.dtype != torch.float64:
            vals = vals.float()
        return sp.csr_array((vals.numpy(), self.indices.cpu().numpy(),
                             self.indptr.cpu().numpy()), shape=self.shape)

    def __repr__(self) -> str:
        vals = tuple(self.values.shape)
        return f"SparseWeights(shape={self.shape}, nnz={self.nnz}, values={vals})"


# --------------------------------------------------------------------------------- checks


def check_temperature(temperature: float | Tensor, num_heads: int) -> None:
    """Raise unless ``temperature`` is a finite float > 0 or a real tensor of shape ``()``,
    ``(1,)`` or ``(num_heads,)`` whose entries are all finite and > 0."""
    if isinstance(temperature, Tensor):
        if temperature.is_complex() or temperature.dtype == torch.bool:
            raise TypeError(f"temperature must be a real tensor, got dtype {temperature.dtype}")
        if temperature.numel() not in (1, num_heads) or temperature.dim() > 1:
            raise ValueError(
                f"temperature must be a float or a tensor of shape ({num_heads},), "
                f"got shape {tuple(temperature.shape)}"
            )
        t = temperature.detach()
        if not bool(((t > 0) & torch.isfinite(t)).all()):
            raise ValueError(f"temperature must be finite and > 0, got {t.tolist()}")
    elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        if not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite float > 0, got {temperature}")
    else:
        raise TypeError(f"temperature must be a float or tensor, got {type(temperature).__name__}")


def check_qkv(q, k, v, *, scale=None, sharded: bool = False) -> None:
    """The checks of ``q``, ``k``, ``v`` (and ``scale``) that every attention entry point
    shares: :func:`attention` and :func:`attnkit.distributed.sequence_parallel_attention`.

    Raises ``TypeError`` / ``ValueError`` naming the argument unless q ``(*batch, Hq, Lq, D)``,
    k ``(*batch, Hkv, Lk, D)``, v ``(*batch, Hkv, Lk, Dv)`` are floating-point tensors of one
    dtype and device with ``Hq % Hkv == 0``, ``D, Dv >= 1``, and ``scale`` is None or a finite
    float. ``sharded=True`` is the sequence-parallel layout: exactly ``(B, H, L_local, D)``,
    q, k and v holding the same positions.
    """
    shapes = ({name: "(B, H, L_local, D)" for name in "qkv"} if sharded else
              {"q": "(B, Hq, Lq, D)", "k": "(B, Hkv, Lk, D)", "v": "(B, Hkv, Lk, Dv)"})
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 4 or (sharded and t.dim() != 4):
            more = "" if sharded else " (or more leading batch dims)"
            raise ValueError(f"{name} must have shape {shapes[name]}{more}, got "
                             f"{t.dim()} dims {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch = tuple(q.shape[:-3])
    if tuple(k.shape[:-3]) != batch or tuple(v.shape[:-3]) != batch:
        raise ValueError(f"batch sizes differ: q {batch}, k {tuple(k.shape[:-3])}, "
                         f"v {tuple(v.shape[:-3])}")
    hq, lq, d = q.shape[-3:]
    if k.shape[-3] != v.shape[-3]:
        raise ValueError(f"k and v must have the same heads Hkv, got {k.shape[-3]} and "
                         f"{v.shape[-3]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same length Lk, got {k.shape[-2]} and "
                         f"{v.shape[-2]}")
    if sharded and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"q, k, v must hold the same positions (self-attention shards), got "
                         f"L_local {q.shape[-2]}, {k.shape[-2]}, {v.shape[-2]}")
    if k.shape[-1] != d:
        raise ValueError(f"k must have head dim D={d} like q, got {k.shape[-1]}")
    if d == 0 or v.shape[-1] == 0:  # no feature to score or to return: a mistake, not a case
        raise ValueError(f"head dims must be >= 1, got D={d} (q, k) and Dv={v.shape[-1]} (v)")
    hkv = k.shape[-3]
    if hq == 0 or hkv == 0:
        raise ValueError(f"q and k/v need at least one head each, got Hq={hq} and Hkv={hkv}")
    if hq % hkv != 0:
        raise ValueError(f"q heads Hq={hq} must be a multiple of k/v heads Hkv={hkv}")
    if scale is not None:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise TypeError(f"scale must be a float, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")


def _check_inputs(q, k, v, pattern, bias, score_mod, scale, temperature, dropout_p, check_finite):
    check_qkv(q, k, v, scale=scale)
    batch = tuple(q.shape[:-3])
    hq, lq, _ = q.shape[-3:]
    lk = k.shape[-2]
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(
            f"pattern must be None or an attnkit.patterns pattern, got {type(pattern).__name__}"
        )
    if score_mod is not None and not callable(score_mod):
        raise TypeError("score_mod must be callable (score, b, h, q_idx, k_idx) -> score")
    check_temperature(temperature, hq)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a tensor, got {type(bias).__name__}")
        # Plain int arithmetic: torch.broadcast_shapes imports sympy on first use (~seconds).
        bshape, full = tuple(bias.shape), (*batch, hq, lq, lk)
        ok = len(bshape) <= len(full) and all(
            s in (1, t) for s, t in zip(reversed(bshape), reversed(full))
        )
        if not ok:
            raise ValueError(
                f"bias of shape {tuple(bias.shape)} does not broadcast to (B, Hq, Lq, Lk) = "
                f"{full}"
            )
    if check_finite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or infinite values")
        if bias is not None and bias.dtype.is_floating_point and bool(torch.isnan(bias).any()):
            raise ValueError("bias contains NaN values")
    if pattern is not None:
        pattern.validate(lq, lk)


def _prepare_bias(bias: Tensor | None, dtype) -> Tensor | None:
    if bias is None:
        return None
    if bias.dim() < 2:  # (Lk,) or a scalar: give it the (Lq, Lk) dims SDPA's mask needs
        bias = bias.reshape((1,) * (2 - bias.dim()) + tuple(bias.shape))
    if bias.dtype == torch.bool:  # a boolean bias is a keep-mask
        return torch.zeros(bias.shape, dtype=dtype, device=bias.device).masked_fill(~bias, NEG_INF)
    return bias


# --------------------------------------------------------------------------------- engine


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern: Pattern | None = None,
    bias: Tensor | None = None,
    score_mod: Callable[..., Tensor] | None = None,
    scale: float | None = None,
    temperature: float | Tensor = 1.0,
    dropout_p: float = 0.0,
    return_weights: bool = False,
    check_finite: bool = False,
) -> Tensor | tuple[Tensor, Tensor | SparseWeights]:
    """Scaled dot-product attention restricted to a pattern.

    Logits are ``scale * q.k / temperature + bias``, then ``score_mod``; softmax runs over the
    keys the pattern allows for each query.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``, with
            ``Hq % Hkv == 0`` (grouped-/multi-query attention shares each K/V head among
            ``Hq // Hkv`` query heads without copying). Several leading batch dims
            ``(*batch, H, L, D)`` are fine (equal for q, k, v): many short sequences, such as
            the lines of a volume along one axis, are read in place whatever their strides
            (:mod:`attnkit.kernels.short`); other calls flatten them (``b`` in ``score_mod``
            is then the flattened batch index).
        pattern: ``None`` (every key) or a pattern from :mod:`attnkit.patterns`.
        bias: additive logits broadcastable to ``(B, Hq, Lq, Lk)`` (a bool tensor is a
            keep-mask). Fine for dense patterns; with sparse ones only the allowed entries are
            read.
        score_mod: ``score_mod(score, b, h, q_idx, k_idx) -> score``, applied only on allowed
            pairs; the index arguments are integer tensors broadcastable to ``score``.
        scale: defaults to ``1 / sqrt(D)``.
        temperature: a float or a ``(Hq,)`` tensor (per head); finite and > 0.
        dropout_p: dropout on the attention weights.
        return_weights: also return the weights: a dense ``(B, Hq, Lq, Lk)`` tensor for dense
            patterns (``None``, ``causal()``), a :class:`SparseWeights` (O(nnz)) otherwise.
        check_finite: raise ``ValueError`` if q, k, v (or bias) hold NaN / inf.

    Returns:
        ``out (B, Hq, Lq, Dv)``, or ``(out, weights)``. Rows with no allowed key give zeros.
        Empty sizes give the empty result: a batch dim ``B = 0``, ``Lq = 0``, or ``Lk = 0``
        (rows without keys: zeros).

    NaN and inf follow :func:`dense_reference` whichever kernel runs (compiled or PyTorch): a
    non-finite query or key makes NaN exactly the rows whose allowed keys give a NaN or
    infinite score; rows that do not see it are unaffected. A non-finite value row is only
    guaranteed to reach the rows that attend to it (inside one block of rows it may also reach
    rows that give it weight zero, as ``0 * inf`` is NaN; the dense reference spreads it to
    every row).

    Raises:
        ValueError: a head dim ``D = 0`` or ``Dv = 0`` (there is nothing to score or return),
            no head (``Hq = 0`` or ``Hkv = 0``), shapes that do not match, a non-finite or
            non-positive ``temperature``, a non-finite ``scale``. The message names the
            argument.
        TypeError: inputs that are not floating-point tensors.
    """
    _check_inputs(q, k, v, pattern, bias, score_mod, scale, temperature, dropout_p, check_finite)
    if 0 in q.shape[:-3]:  # a batch dim B = 0: nothing to compute, no kernel to start
        return _empty_batch(q, k, v, pattern, return_weights)
    if (pattern is None and score_mod is None and not return_weights and bias is None
            and not dropout_p and not isinstance(temperature, Tensor) and short_ok(q, k, v)):
        # many short sequences (axial lines, patches): the compiled short-sequence kernels,
        # reading q/k/v in place whatever their strides and leading dims
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        return short_attention(q, k, v, scale / float(temperature))
    if q.dim() > 4:
        return _attention_flat_batch(q, k, v, pattern=pattern, bias=bias, score_mod=score_mod,
                                     scale=scale, temperature=temperature, dropout_p=dropout_p,
                                     return_weights=return_weights)
    B, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    bias = _prepare_bias(bias, q.dtype)
    dense = pattern is None or isinstance(pattern, Causal)

    if (dense and score_mod is None and not return_weights and bias is None
            and not isinstance(temperature, Tensor)
            and _decode_ok(q, k, v, pattern, dropout_p, lq, lk, g)):
        # the group's query heads as rows of its key/value head; the scale goes into the kernel
        qr = q.reshape(B, hkv, g * lq, d)
        out = native.decode_forward(qr, k, v, scale / float(temperature))[0]
        return out.view(B, hq, lq, dv)

    per_head_temp = isinstance(temperature, Tensor) and temperature.numel() > 1
    if isinstance(temperature, Tensor) and not per_head_temp:
        temperature = temperature.reshape(())
        per_head_temp = temperature.requires_grad  # keep it differentiable
    ctx = Ctx(lq=lq, lk=lk, batch=B, hkv=hkv, groups=g,
              bias=None if bias is None else bias.expand(B, hq, lq, lk),
              score_mod=score_mod, dropout_p=float(dropout_p), need_lse=return_weights)
    comps = None if dense else lower(pattern.plan(lq, lk), lq, lk)
    if per_head_temp:
        t = temperature.to(q.dtype).reshape(-1, 1, 1) if temperature.dim() else temperature
        qs = q * (scale / t)
    else:
        factor = scale / float(temperature)
        if factor != 1.0 and comps is not None and scale_in_kernel(
                comps, q.view(B, hkv, g, lq, d), k, v, ctx):
            qs, ctx.q_scale = q, factor  # the band kernel scales the queries itself
        else:
            qs = q if factor == 1.0 else q * factor

    if dense and score_mod is None and not return_weights:
        out = _sdpa(qs, k, v, pattern, bias, dropout_p, lq, lk, g)
        if out is not None:
            return out

    qg = qs.view(B, hkv, g, lq, d)

    if dense and return_weights:
        out, weights = _dense_with_weights(qg, k, v, pattern, ctx)
        return out.reshape(B, hq, lq, dv), weights

    if dense:
        comps = lower([AllKeys(masks=(MaskTerm(pattern),))] if isinstance(pattern, Causal)
                      else [AllKeys()], lq, lk)
    if return_weights:  # a band's weights written by the forward, where it can
        # one component: its allowed pairs are the pattern's (sizes a masked band's buffers)
        nnz = pattern.nnz_from_offsets(lq, lk) if len(comps) == 1 else None
        ctx.weights_sink = weights_sink(qg, k, v, comps, ctx, nnz)
        if (ctx.weights_sink is not None and ctx.weights_sink.counts is not None
                and isinstance(ctx.weights_sink.comp, Ranges)):
            # a masked band's weights are its probabilities (it runs without bias or
            # score_mod, so they never need the second pass): no lse needed
            ctx.need_lse = False
    out, lse = structured_attention(qg, k, v, comps, ctx)
    out = out.reshape(B, hq, lq, dv).to(q.dtype)
    if not return_weights:
        return out
    return out, _sparse_weights(qg, k, comps, ctx, lse)


def _empty_batch(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern | None,
                 return_weights: bool):
    """The result of :func:`attention` for a batch dim of size 0: ``out (*batch, Hq, Lq, Dv)``
    (and weights shaped as usual), empty, yet part of the autograd graph of q, k, v."""
    link = q.sum() + k.sum() + v.sum()  # exactly 0: every input is empty
    out = q.new_zeros(*q.shape[:-1], v.shape[-1]) + link
    if not return_weights:
        return out
    lead, lq, lk = q.shape[:-2], q.shape[-2], k.shape[-2]
    if pattern is None or isinstance(pattern, Causal):
        return out, q.new_zeros(*lead, lq, lk) + link
    indptr, indices = pattern.csr(lq, lk, q.device)
    dtype = index_dtype(indices.numel(), lk)  # as the weights of a batch that is not empty
    indptr, indices = indptr.to(dtype), indices.to(dtype)
    return out, SparseWeights(indptr, indices, q.new_zeros(*lead, indices.numel()) + link,
                              (lq, lk))


def _attention_flat_batch(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None,
                          return_weights: bool, **kw):
    """:func:`attention` on ``(*batch, H, L, D)`` inputs with several batch dims: flattened to
    one (a copy where the strides do not allow a view), results shaped back."""
    batch = q.shape[:-3]
    flat = [t.reshape(-1, *t.shape[-3:]) for t in (q, k, v)]
    if bias is not None and bias.dim() > 3:
        if all(s == 1 for s in bias.shape[:-3]):
            bias = bias.reshape(bias.shape[-3:])
        else:
            bias = bias.expand(*batch, *bias.shape[-3:]).reshape(-1, *bias.shape[-3:])
    res = attention(*flat, bias=bias, return_weights=return_weights, **kw)
    out, weights = res if return_weights else (res, None)
    out = out.reshape(*batch, *out.shape[1:])
    if not return_weights:
        return out
    if isinstance(weights, SparseWeights):
        weights = SparseWeights(weights.indptr, weights.indices,
                                weights.values.reshape(*batch, *weights.values.shape[1:]),
                                weights.shape)
    else:
        weights = weights.reshape(*batch, *weights.shape[1:])
    return out, weights


def _decode_ok(qs, k, v, pattern, dropout_p, lq, lk, g) -> bool:
    """Whether a dense call is a decoding step for :func:`native.decode_forward`: every query
    sees every key, a few rows per key/value head, a long cache, fp32 on CPU, no autograd."""
    return (g * lq <= DECODE_MAX_ROWS and lk >= DECODE_MIN_KEYS and not dropout_p
            and (pattern is None or lq == 1)  # a single causal query sees every key
            and qs.shape[-1] > 0 and v.shape[-1] > 0
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (qs, k, v))
            and not (torch.is_grad_enabled() and (qs.requires_grad or k.requires_grad
                                                  or v.requires_grad))
            and native.decode_available())


def _sdpa(qs, k, v, pattern, bias, dropout_p, lq, lk, g) -> Tensor | None:
    """Dense calls go to torch's fused SDPA; None when SDPA cannot give the exact answer."""
    is_causal = False
    mask = bias
    if isinstance(pattern, Causal):
        if lq > lk:
            return None  # leading rows have no key: SDPA would give NaN
        if lq == lk and mask is None:
            is_causal = True
        elif lq < lk:
            keep = torch.ones(lq, lk, dtype=torch.bool, device=qs.device).tril(lk - lq)
            mask = keep if mask is None else mask.masked_fill(~keep, NEG_INF)
        else:
            keep = torch.ones(lq, lk, dtype=torch.bool, device=qs.device).tril()
            mask = mask.masked_fill(~keep, NEG_INF)
    if mask is not None and mask.dtype != torch.bool:
        if bool(torch.isneginf(mask).all(-1).any()):
            return None  # a fully masked row: SDPA gives NaN, our kernels give zeros
        mask = mask.to(qs.dtype)
    kw = {}
    if g > 1:
        if _SDPA_HAS_GQA:
            kw["enable_gqa"] = True
        else:  # older torch: materialize the shared heads
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(
        qs, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=1.0, **kw
    )


def _dense_with_weights(qg, k, v, pattern, ctx: Ctx):
    """Dense attention that also returns ``(B, Hq, Lq, Lk)`` weights (inherently O(Lq*Lk))."""
    B, hkv, g, lq, d = qg.shape
    lk = k.shape[2]
    qi = torch.arange(lq, device=qg.device).unsqueeze(1)
    kj = torch.arange(lk, device=qg.device).unsqueeze(0)
    valid = torch.ones(lq, lk, dtype=torch.bool, device=qg.device)
    if pattern is not None:
        valid = valid & pattern.allowed(qi, kj, lq, lk)
    s = torch.matmul(qg.reshape(B, hkv, g * lq, d), k.transpose(-1, -2)).view(B, hkv, g, lq, lk)
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    s = finish_scores(s, qi, kj, valid, ctx)
    nodrop = Ctx(**{**ctx.__dict__, "dropout_p": 0.0})
    w, _ = softmax_rows(s, nodrop, True)
    p = F.dropout(w, ctx.dropout_p, training=True) if ctx.dropout_p > 0 else w
    out = torch.matmul(p.to(v.dtype).reshape(B, hkv, g * lq, lk), v)
    return out, w.reshape(B, hkv * g, lq, lk).to(qg.dtype)


def _sparse_weights(qg, k, comps, ctx: Ctx, lse: Tensor) -> SparseWeights:
    """Weights of every allowed pair, ``exp(score - lse)``, in CSR order: O(nnz) memory, the
    scores recomputed by each component's own kernel step (see
    :func:`.kernels.enumerate.pair_weights`)."""
    B, hkv, g, lq, _ = qg.shape
    indptr, indices, values = pair_weights(qg, k, comps, ctx, lse)
    return SparseWeights(indptr, indices, values.reshape(B, hkv * g, -1).to(qg.dtype),
                         (lq, ctx.lk))


def dense_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    scale: float | None = None,
    temperature: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor]:
    """Plain dense masked softmax attention, for tests. ``mask (Lq, Lk)`` bool (True = allowed).

    Returns ``(out (B, Hq, Lq, Dv), weights (B, Hq, Lq, Lk))``; empty rows give zeros.
    """
    hq, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hkv, 1)
    v = v.repeat_interleave(hq // hkv, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if isinstance(temperature, Tensor) and temperature.dim() == 1:
        temperature = temperature.view(-1, 1, 1)
    s = (q @ k.transpose(-1, -2)) * scale / temperature
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    w = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return w @ v, w
