"""Hugging Face ``transformers`` models with their attention on :func:`attnkit.attention`.

::

    from attnkit import patterns as P
    from attnkit.integrations.transformers import register

    register(pattern=P.sliding_window(256) & P.causal() | P.global_tokens([0]))
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnkit")

:func:`register` adds an attention function and a mask function named ``"attnkit"`` to
``transformers.AttentionInterface`` / ``AttentionMaskInterface``. What a layer computes:

- **No pattern, no sliding window that cuts anything** (``register()``): the model's mask is
  built exactly as for ``attn_implementation="sdpa"`` (a boolean ``(B, 1, Lq, Lk)`` mask, or
  none where causality alone describes it) and goes to :func:`attnkit.attention` as its
  boolean bias: the same result as ``"sdpa"``.
- **A pattern, or a sliding window (Mistral / Gemma style) that cuts keys**: no
  ``Lq x Lk`` mask is built. The model's own mask function (causal, sliding window, padding,
  packed sequences, ...) is read lazily, per block of candidate pairs, as a
  :func:`attnkit.patterns.from_mask_mod` predicate, intersected with the pattern (or, without
  a pattern, with the layer's window ``sliding_window(W - 1) & causal()``, checked against the
  mask on a few rows), which enumerates the candidates; transformers' plain causal mask is
  ``causal()`` itself, so only padding stays a predicate there. A query sees a key iff the
  pattern allows it **and** the model's mask does: ``global_tokens`` in a causal model sees
  only earlier tokens. Batch rows run one at a time (padding and packing differ per row).

Pattern positions are absolute token positions (padding included): with a cache, including
sliding-window and static caches, query ``i`` is at the cache's offset plus ``i``.
Grouped-query heads (fewer key/value heads) go to :func:`attnkit.attention` as they are;
``scaling`` and ``dropout`` are passed on. Features attnkit cannot reproduce exactly
(attention sinks ``s_aux``, logit soft-capping, ALiBi / position biases, head masks) raise
``NotImplementedError`` instead of giving a different result. Attention weights are not
returned (``None``, as with ``"sdpa"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import patterns as P
from ..functional import attention

__all__ = ["register", "LazyMask"]

_EXTRA_HINT = "pip install 'attnkit[bench]' (or pip install transformers)"

# kwargs a model may hand its attention function that attnkit does not compute (exactly).
_UNSUPPORTED = {
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "softcap": "attention logit soft-capping (softcap)",
    "position_bias": "an additive position bias (position_bias)",
    "alibi": "ALiBi biases (alibi)",
    "head_mask": "head masks (head_mask)",
}


@dataclass(frozen=True)
class LazyMask:
    """The model's mask, not materialized: what the ``"attnkit"`` mask function returns when
    a pattern is registered or a sliding window cuts keys.

    Attributes:
        mask_function: transformers' ``(batch_idx, head_idx, q_idx, kv_idx) -> bool`` over
            absolute positions (query ``i`` is at ``q_offset + i``, key ``j`` at
            ``kv_offset + j``).
        padding_mask: ``(B, >= kv_offset + kv_length)`` bool, True = real token, or None.
        batch_size, q_length, kv_length, q_offset, kv_offset: the sizes transformers computed.
        use_vmap: the mask function needs scalar indices (evaluated through ``torch.vmap``).
        standard: transformers' causal / sliding-window / bidirectional mask with padding
            only (no extra mask functions, packed sequences or blocks).
    """

    mask_function: Callable
    padding_mask: Tensor | None
    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    use_vmap: bool = False
    standard: bool = True

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, 1, Lq, Lk)``, the shape the mask stands for (as transformers' 4D masks)."""
        return (self.batch_size, 1, self.q_length, self.kv_length)

    @property
    def ndim(self) -> int:
        return 4

    def mask_mod(self, batch: int) -> Callable:
        """Batch row ``batch``'s mask as a FlexAttention-style ``mask_mod`` over the local
        indices ``0..q_length-1`` and ``0..kv_length-1``."""
        fn, pad, use_vmap = self.mask_function, self.padding_mask, self.use_vmap
        q_off, kv_off = self.q_offset, self.kv_offset

        def one(b, h, q, kv):
            keep = fn(b, h, q + q_off, kv + kv_off)
            if pad is not None:
                keep = keep & pad[b, kv + kv_off]
            return keep

        def mask_mod(b, h, q_idx, kv_idx):
            b = b + batch
            if not use_vmap:
                return torch.as_tensor(one(b, h, q_idx, kv_idx), device=q_idx.device)
            # mask functions written for scalars (transformers builds those with vmap too)
            from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

            q_idx, kv_idx = torch.broadcast_tensors(q_idx, kv_idx)
            with TransformGetItemToIndex():
                out = torch.vmap(lambda q, kv: one(b, h, q, kv))(q_idx.reshape(-1),
                                                                  kv_idx.reshape(-1))
            return out.reshape(q_idx.shape)

        return mask_mod


def _import_transformers():
    try:
        import transformers  # noqa: F401
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError(
            "attnkit.integrations.transformers needs Hugging Face transformers (>= 4.53, with "
            f"AttentionInterface and AttentionMaskInterface): {_EXTRA_HINT}"
        ) from e
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


def register(pattern: P.Pattern | None = None, *, name: str = "attnkit") -> str:
    """Register attnkit as the attention implementation ``name`` in ``transformers``.

    Afterwards ``AutoModelForCausalLM.from_config(cfg, attn_implementation=name)`` (or
    ``from_pretrained(..., attn_implementation=name)``, or ``model.set_attn_implementation``)
    runs every attention layer on :func:`attnkit.attention`. Registering again under the
    same name replaces the pattern.

    Args:
        pattern: ``None`` (the model's own masks) or an attnkit pattern every layer is further
            restricted to, in absolute token positions (e.g.
            ``sliding_window(w) & causal() | global_tokens([0])``).
        name: the ``attn_implementation`` name.

    Returns:
        ``name``.

    Raises:
        ImportError: transformers is not installed (it is in the ``bench`` extra).
    """
    if pattern is not None and not isinstance(pattern, P.Pattern):
        raise TypeError(
            f"pattern must be None or an attnkit.patterns pattern, got {type(pattern).__name__}"
        )
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    attention_interface, mask_interface, sdpa_mask = _import_transformers()
    attention_interface.register(name, _make_attention(pattern))
    mask_interface.register(name, _make_mask(pattern, sdpa_mask))
    return name


# ----------------------------------------------------------------------------------- masks


def _make_mask(pattern: P.Pattern | None, sdpa_mask: Callable) -> Callable:
    def attnkit_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0,
                     kv_offset: int = 0, mask_function: Callable | None = None,
                     attention_mask: Tensor | None = None, local_size: int | None = None,
                     allow_is_causal_skip: bool = True, allow_is_bidirectional_skip=False,
                     use_vmap: bool = False, device="cpu", **kwargs):
        """transformers' mask-interface signature (see ``masking_utils.sdpa_mask``)."""
        if mask_function is None:
            from transformers.masking_utils import causal_mask_function as mask_function
        if isinstance(attention_mask, LazyMask):
            # generate() builds the mask of a static (compileable) cache up front and hands it
            # to the model, which asks for it again: it is this very mask
            same = (attention_mask.q_length, attention_mask.kv_length, attention_mask.kv_offset,
                    attention_mask.q_offset) == (q_length, kv_length, int(kv_offset),
                                                 int(q_offset))
            if not same:
                raise ValueError("attnkit: a mask built for other sizes was passed back")
            return attention_mask
        window_cuts = local_size is not None and kv_length > local_size
        if pattern is None and not window_cuts:
            # dense: exactly sdpa's boolean mask (or None where is_causal describes it)
            return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                             q_offset=q_offset, kv_offset=kv_offset,
                             mask_function=mask_function, attention_mask=attention_mask,
                             local_size=local_size, allow_is_causal_skip=allow_is_causal_skip,
                             allow_is_bidirectional_skip=allow_is_bidirectional_skip,
                             use_vmap=use_vmap, device=device, **kwargs)
        pad = attention_mask
        if pad is not None:
            need = kv_length + kv_offset - pad.shape[-1]
            if need > 0:  # static caches: keys past the mask are empty slots
                pad = torch.nn.functional.pad(pad, (0, need))
            pad = pad.to(device=device, dtype=torch.bool)
        return LazyMask(mask_function=mask_function, padding_mask=pad, batch_size=batch_size,
                        q_length=q_length, kv_length=kv_length, q_offset=int(q_offset),
                        kv_offset=int(kv_offset), use_vmap=bool(use_vmap),
                        standard=bool(allow_is_causal_skip) and not use_vmap)

    return attnkit_mask


# ------------------------------------------------------------------------------- attention


def _check_supported(kwargs: dict) -> None:
    for key, what in _UNSUPPORTED.items():
        if kwargs.get(key) is not None:
            raise NotImplementedError(
                f"attnkit attention does not support {what}; load this model with "
                "attn_implementation='eager' or 'sdpa'"
            )


def _window(module, sliding_window) -> int | None:
    w = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        return None  # none, or a form not known here: the mask function alone decides
    return w


def _absolute(pattern: P.Pattern, m: LazyMask) -> P.Pattern:
    """``pattern`` over absolute positions when the keys do not start at position 0 or the
    queries are not the last keys (sliding-window and static caches): a lazy predicate."""
    n = max(m.q_offset + m.q_length, m.kv_offset + m.kv_length)
    pattern.validate(n, n)

    def mask_mod(b, h, q_idx, kv_idx):
        return pattern.allowed(q_idx + m.q_offset, kv_idx + m.kv_offset, n, n)

    return P.from_mask_mod(mask_mod)


def _covers(enum: P.Pattern, m: LazyMask, lq: int, lk: int, device) -> bool:
    """Whether the band ``enum`` holds every pair the model's mask allows on a few probe rows
    (first, middle, last query, all keys): a check that the window was read as meant."""
    i = torch.tensor(sorted({0, lq // 2, lq - 1}), device=device).unsqueeze(1)
    j = torch.arange(lk, device=device).unsqueeze(0)
    for row in range(m.batch_size):
        keep = P.from_mask_mod(m.mask_mod(row)).allowed(i, j, lq, lk)
        if bool((keep & ~enum.allowed(i, j, lq, lk)).any()):
            return False
    return True


def _key_mask(keys: Tensor) -> Callable:
    """``mask_mod`` of a ``(Lk,)`` bool key mask (True = real token)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return keys[kv_idx].expand(torch.broadcast_shapes(q_idx.shape, kv_idx.shape))

    return mask_mod


def _make_attention(pattern: P.Pattern | None) -> Callable:
    def attnkit_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor,
                                  value: Tensor, attention_mask, scaling: float | None = None,
                                  dropout: float = 0.0, sliding_window: int | None = None,
                                  is_causal: bool | None = None, **kwargs):
        """transformers' attention-function signature: ``query (B, Hq, Lq, D)``, ``key``
        and ``value (B, Hkv, Lk, D)``; returns ``(out (B, Lq, Hq, Dv), None)``."""
        _check_supported(kwargs)
        scale = None if scaling is None else float(scaling)
        dropout = float(dropout)
        if isinstance(attention_mask, LazyMask):
            out = _lazy(module, query, key, value, attention_mask, pattern, scale, dropout,
                        _window(module, sliding_window))
        else:
            out = _dense(module, query, key, value, attention_mask, pattern, scale, dropout,
                         is_causal)
        return out.transpose(1, 2).contiguous(), None

    attnkit_attention_forward.pattern = pattern
    return attnkit_attention_forward


def _dense(module, query, key, value, mask, pattern, scale, dropout, is_causal) -> Tensor:
    """A materialized mask (or none), as ``sdpa_attention_forward`` reads it."""
    if mask is not None and not isinstance(mask, Tensor):
        raise TypeError(
            "attnkit attention takes a boolean or additive mask tensor (or the mask its own "
            f"mask function builds), got {type(mask).__name__}"
        )
    lq, lk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and mask is None and lq > 1
    if causal and lk > lq:
        # an empty static cache at prefill: the keys past the queries are empty slots (sdpa
        # reads is_causal top-left aligned and crops them the same way)
        key, value = key[:, :, :lq], value[:, :, :lq]
    if causal:
        pattern = P.causal() if pattern is None else pattern & P.causal()
    return attention(query, key, value, pattern=pattern, bias=mask, scale=scale,
                     dropout_p=dropout)


def _lazy(module, query, key, value, m: LazyMask, pattern, scale, dropout, window) -> Tensor:
    """The model's mask read lazily per block, intersected with the pattern (or the layer's
    window), one batch row at a time."""
    B, lq, lk = query.shape[0], query.shape[2], key.shape[2]
    if (lq, lk) != (m.q_length, m.kv_length):
        raise ValueError(
            f"attention got Lq={lq}, Lk={lk} but its mask was built for Lq={m.q_length}, "
            f"Lk={m.kv_length}"
        )
    if m.batch_size not in (1, B):
        raise ValueError(f"mask built for batch {m.batch_size}, attention got batch {B}")
    aligned = m.q_offset + lq == m.kv_offset + lk  # queries are the last keys
    if pattern is not None:
        enum = pattern if aligned and m.kv_offset == 0 else _absolute(pattern, m)
    elif window is not None and m.standard and aligned:
        # transformers' sliding windows: kv > q - W (causal, offsets -(W-1)..0) or
        # |q - kv| <= W (bidirectional); the band only enumerates candidates, the model's
        # mask function (a subset of it) stays the exact predicate
        causal = getattr(module, "is_causal", True)
        enum = P.sliding_window(window - 1) & P.causal() if causal else P.sliding_window(window)
        if not _covers(enum, m, lq, lk, query.device):
            enum = None  # the layer's window means something else here: every key is a candidate
    else:
        enum = None
    from transformers.masking_utils import causal_mask_function

    # transformers' plain causal mask (its own function, nothing added) is exactly causal():
    # then only padding needs the lazy predicate, and bands keep their fast kernels
    plain = m.mask_function is causal_mask_function and aligned and m.kv_offset == 0
    outs = []
    for b in range(B):
        row = b if m.batch_size > 1 else 0
        if plain:
            keep = P.causal()
            if m.padding_mask is not None and not bool(m.padding_mask[row, :lk].all()):
                keep = keep & P.from_mask_mod(_key_mask(m.padding_mask[row, :lk]))
        else:
            keep = P.from_mask_mod(m.mask_mod(row))
        p = keep if enum is None else enum & keep
        outs.append(attention(query[b:b + 1], key[b:b + 1], value[b:b + 1], pattern=p,
                              scale=scale, dropout_p=dropout))
    return outs[0] if B == 1 else torch.cat(outs, 0)
