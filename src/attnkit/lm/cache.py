"""Key/value caches for autoregressive decoding.

A cache holds, for every layer, the keys and values ``(B, Hkv, L, D)`` of the positions already
processed, so each decoding step computes projections for the new token only and attends to
the stored past. A multi-query model (``Hkv = 1``) stores ``1 / num_heads`` of a multi-head
model's bytes.

- :class:`DynamicCache` grows as needed (capacity doubles, so appending is amortized O(1)
  instead of copying the whole past every step).
- :class:`StaticCache` preallocates ``max_len`` positions; overflowing it raises ``ValueError``.
- :class:`SlidingWindowCache` keeps the last ``window`` positions: exactly what a model whose
  attention pattern is ``causal() & sliding_window(window)`` can still see.
- :class:`QuantizedCache` stores keys and values in 8 bits (per-channel key scales,
  per-token value scales, as KIVI), dequantised just before the attention kernel.

``.nbytes`` is the size of the tensors the cache actually holds (capacity included).

A cache belongs to one sequence: :func:`attnkit.lm.generate` refuses a cache that already
holds positions (``ValueError``); call :meth:`KVCache.reset` to reuse it for a new prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_positive_int
from ..kernels.native import huge_page_empty
from ..patterns import Causal, Pattern, causal, sliding_window

__all__ = ["KVCache", "DynamicCache", "StaticCache", "SlidingWindowCache", "QuantizedCache"]


def _check_kv(k: Tensor, v: Tensor) -> None:
    if not isinstance(k, Tensor) or not isinstance(v, Tensor):
        raise TypeError("k and v must be tensors of shape (B, Hkv, L, D)")
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must have shapes (B, Hkv, L, D) and (B, Hkv, L, Dv), got "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )


def _check_matches_cached(k: Tensor, v: Tensor, old_k: Tensor, old_v: Tensor,
                          layer_idx: int) -> None:
    """New ``k``/``v`` must have the cached layer's batch, heads and channel widths."""
    if (k.shape[0], k.shape[1], k.shape[3]) != (old_k.shape[0], old_k.shape[1], old_k.shape[3]) \
            or v.shape[3] != old_v.shape[3]:
        raise ValueError(
            f"k/v of shape {tuple(k.shape)}/{tuple(v.shape)} do not match the cached "
            f"(B, Hkv, *, D) = {tuple(old_k.shape)}/{tuple(old_v.shape)} of layer {layer_idx}"
        )


class KVCache:
    """Per-layer key/value storage. Subclasses decide how much of the past is kept.

    The attention layer calls, for its ``layer_idx``: :meth:`seq_length` (the absolute position
    of its first new token), :meth:`update` (append and get everything attendable) and
    :meth:`attention_pattern` (the pattern to use against the returned keys).
    """

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._keys: list[Tensor | None] = []
        self._values: list[Tensor | None] = []
        self._held: list[int] = []  # valid positions stored per layer
        self._seen: list[int] = []  # positions processed per layer (absolute offset)

    def _slot(self, layer_idx: int) -> None:
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be a non-negative int, got {layer_idx!r}")
        while len(self._keys) <= layer_idx:
            self._keys.append(None)
            self._values.append(None)
            self._held.append(0)
            self._seen.append(0)

    def seq_length(self, layer_idx: int = 0) -> int:
        """Positions processed so far by this layer (the position of its next token)."""
        return self._seen[layer_idx] if layer_idx < len(self._seen) else 0

    def held_length(self, layer_idx: int = 0) -> int:
        """Positions currently stored for this layer."""
        return self._held[layer_idx] if layer_idx < len(self._held) else 0

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k (B, Hkv, n, D)``, ``v (B, Hkv, n, Dv)`` to this layer's slot.

        Returns the keys and values the new queries attend to, ``(B, Hkv, Lk, D)`` with the new
        ones last (they may be views into the cache's buffers).
        """
        _check_kv(k, v)
        self._slot(layer_idx)
        old = self._keys[layer_idx]
        if old is not None:
            _check_matches_cached(k, v, old, self._values[layer_idx], layer_idx)
            if k.dtype != old.dtype or k.device != old.device:
                raise ValueError("k/v must have the cache's dtype and device")
        return self._append(layer_idx, k, v)

    def _append(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def attention_pattern(self, pattern: Pattern | None, lq: int, lk: int) -> Pattern | None:
        """The pattern for ``lq`` new queries against the ``lk`` keys :meth:`update` returned.

        Keys are contiguous positions ending at the last query, so positional patterns apply
        unchanged (queries are the last ``lq`` positions). A single causal query sees every
        key: ``None`` then takes the fast unmasked path.
        """
        if isinstance(pattern, Causal) and lq == 1:
            return None
        return pattern

    def tensors(self) -> list[Tensor]:
        """Every tensor the cache holds."""
        return [t for t in self._keys + self._values if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors actually held (allocated capacity included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def num_layers(self) -> int:
        return len(self._keys)

    def reset(self) -> None:
        """Drop everything (buffers are released); settings such as ``max_len`` stay."""
        self._clear()


class _BufferCache(KVCache):
    """Keys/values written in place into per-layer buffers ``(B, Hkv, capacity, D)``."""

    def _capacity_for(self, layer_idx: int, needed: int, current: int) -> int:
        raise NotImplementedError

    def _append(self, layer_idx, k, v):
        n, held = k.shape[2], self._held[layer_idx]
        buf_k, buf_v = self._keys[layer_idx], self._values[layer_idx]
        current = 0 if buf_k is None else buf_k.shape[2]
        if held + n > current:
            cap = self._capacity_for(layer_idx, held + n, current)
            shape_k = (k.shape[0], k.shape[1], cap, k.shape[3])
            shape_v = (v.shape[0], v.shape[1], cap, v.shape[3])
            if k.is_cpu and k.dtype == v.dtype:
                # each decoding step streams the whole cache: on huge pages as it fills
                new_k, new_v = huge_page_empty((shape_k, shape_v), k.dtype)
            else:
                new_k, new_v = k.new_empty(shape_k), v.new_empty(shape_v)
            if held:
                new_k[:, :, :held] = buf_k[:, :, :held]
                new_v[:, :, :held] = buf_v[:, :, :held]
            buf_k, buf_v = new_k, new_v
            self._keys[layer_idx], self._values[layer_idx] = buf_k, buf_v
        # narrow + copy_: two ops where indexing takes several (this runs every step)
        buf_k.narrow(2, held, n).copy_(k)
        buf_v.narrow(2, held, n).copy_(v)
        self._held[layer_idx] = held + n
        self._seen[layer_idx] += n
        return buf_k.narrow(2, 0, held + n), buf_v.narrow(2, 0, held + n)


    def _decode_slot(self, layer_idx: int, batch: int, heads: int, head_dim: int,
                     pattern: Pattern | None) -> tuple[Tensor, Tensor, int] | None:
        """This layer's key and value buffers ``(batch, heads, capacity, head_dim)`` and the
        position one new token per sequence goes to, for a step that writes them itself and
        attends to every cached position (the native decoder block step), then calls
        :meth:`_advance`; None when the layer's ``pattern`` hides some cached position from
        the new token, or the buffers do not exist yet, are full, or have another layout or
        dtype (the caller takes :meth:`update`, which allocates and grows)."""
        if layer_idx >= len(self._keys):
            return None
        buf_k, buf_v, held = self._keys[layer_idx], self._values[layer_idx], self._held[layer_idx]
        if self.attention_pattern(pattern, 1, held + 1) is not None:
            return None
        for buf in (buf_k, buf_v):
            if (buf is None or buf.dim() != 4 or buf.dtype != torch.float32 or not buf.is_cpu
                    or not buf.is_contiguous() or held >= buf.shape[2]
                    or (buf.shape[0], buf.shape[1], buf.shape[3]) != (batch, heads, head_dim)):
                return None
        return buf_k, buf_v, held

    def _advance(self, layer_idx: int, n: int) -> None:
        """Count ``n`` positions written into this layer's buffers by the caller."""
        self._held[layer_idx] += n
        self._seen[layer_idx] += n


class DynamicCache(_BufferCache):
    """Grows without bound; capacity doubles when full (at most 2x the used positions)."""

    def _capacity_for(self, layer_idx, needed, current):
        return max(needed, 2 * current, 16)


class StaticCache(_BufferCache):
    """Preallocates ``max_len`` positions per layer on first use; overflowing raises."""

    def __init__(self, max_len: int):
        check_positive_int("max_len", max_len)
        super().__init__()
        self.max_len = max_len

    def _capacity_for(self, layer_idx, needed, current):
        if needed > self.max_len:
            raise ValueError(
                f"StaticCache overflow: layer {layer_idx} needs {needed} positions but "
                f"max_len={self.max_len}; create it with a larger max_len"
            )
        return self.max_len


class SlidingWindowCache(KVCache):
    """Keeps the last ``window`` positions of each layer.

    It serves models whose attention pattern is ``causal() & sliding_window(window)`` (a query
    at position ``p`` sees ``p - window .. p``): the ``window`` stored positions plus the new
    token are exactly what the next query may see, so decoding matches the uncached windowed
    model while memory stays ``O(window)``. Using it with any other pattern raises
    ``ValueError`` (the results would silently differ).
    """

    def __init__(self, window: int):
        check_positive_int("window", window)
        super().__init__()
        self.window = window

    def _append(self, layer_idx, k, v):
        old_k, old_v = self._keys[layer_idx], self._values[layer_idx]
        all_k = k if old_k is None else torch.cat([old_k, k], dim=2)
        all_v = v if old_v is None else torch.cat([old_v, v], dim=2)
        # clone: a slice would keep the whole concatenated storage alive.
        self._keys[layer_idx] = all_k[:, :, -self.window:].clone()
        self._values[layer_idx] = all_v[:, :, -self.window:].clone()
        self._held[layer_idx] = self._keys[layer_idx].shape[2]
        self._seen[layer_idx] += k.shape[2]
        return all_k, all_v

    def attention_pattern(self, pattern, lq, lk):
        if pattern is None or pattern.offset_range != (-self.window, 0):
            raise ValueError(
                f"SlidingWindowCache(window={self.window}) requires the attention pattern "
                f"causal() & sliding_window({self.window}), got {pattern!r}"
            )
        if lq == 1 and lk <= self.window + 1:
            return None  # every held key is in the single query's window
        # The held keys are a contiguous run of positions ending at the last query, so the
        # positional convention (queries are the last lq positions) still places them right.
        return causal() & sliding_window(self.window)


def _check_finite(name: str, x: Tensor, layer_idx: int) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"QuantizedCache: {name} of layer {layer_idx} hold NaN or inf; an 8-bit scale "
            "cannot represent them (the model produced non-finite activations)"
        )


def _quantize(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Symmetric int8 of ``x`` with one scale per slice along ``dim`` reduced away:
    ``x ~ q * scale``, ``scale = max|x| / 127`` (a zero slice gets scale 0 and codes 0)."""
    scale = x.abs().amax(dim, keepdim=True).float() / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x.float() / safe).clamp_(-127, 127).to(torch.int8)
    return q, scale


class QuantizedCache(KVCache):
    """Keys and values stored in 8 bits (KIVI, Liu et al. 2024; Hugging Face's quantized
    cache), about a quarter of an fp32 cache's bytes.

    - Keys: per-channel scales. Each run of ``group_size`` consecutive positions of a key
      head has one scale per channel (keys have outlier channels, fixed across tokens, so a
      per-token scale would waste the 8 bits of every other channel). The positions of the
      unfinished group (fewer than ``group_size``) are held in the input dtype until the group
      is complete (KIVI's full-precision residual).
    - Values: per-token scales (one per position and head, over its channels), quantised as
      they arrive.

    Quantisation is symmetric: ``x ~ q * scale``, ``q`` in ``[-127, 127]``,
    ``scale = max|x| / 127``. :meth:`update` dequantises the whole layer just before the
    attention kernel, into a workspace shared by all layers (one layer's worth of floating-point
    memory): the returned tensors are valid until the next :meth:`update` call, which is how
    :class:`~attnkit.nn.SelfAttention` uses them. Keys or values holding NaN or inf raise
    ``ValueError`` (a scale cannot represent them). ``nbytes`` counts the 8-bit codes, the
    fp32 scales and the residual (capacity included); ``workspace_nbytes`` the workspace.

    Args:
        group_size: positions per key scale group (default 64; at least 1).
    """

    def __init__(self, group_size: int = 64):
        check_positive_int("group_size", group_size)
        self.group_size = group_size
        self._work: list[Tensor | None] = [None, None]
        super().__init__()

    def _clear(self) -> None:
        super()._clear()
        self._key_scales: list[Tensor | None] = []  # (B, Hkv, capacity / G, D) fp32
        self._value_scales: list[Tensor | None] = []  # (B, Hkv, capacity, 1) fp32
        self._residual: list[Tensor | None] = []  # (B, Hkv, < G, D) keys of the open group
        self._dtypes: list[torch.dtype | None] = []
        self._work = [None, None]

    def _slot(self, layer_idx: int) -> None:
        super()._slot(layer_idx)
        for extra in (self._key_scales, self._value_scales, self._residual, self._dtypes):
            while len(extra) < len(self._keys):
                extra.append(None)

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Quantise and append ``k (B, Hkv, n, D)``, ``v (B, Hkv, n, Dv)``; return every
        held position, dequantised to ``k``'s dtype, ``(B, Hkv, Lk, D)`` (workspace views)."""
        _check_kv(k, v)
        if not k.is_floating_point() or v.dtype != k.dtype:
            raise ValueError(
                f"k and v must share one floating dtype, got {k.dtype} and {v.dtype}"
            )
        self._slot(layer_idx)
        old = self._keys[layer_idx]
        if old is not None:
            _check_matches_cached(k, v, old, self._values[layer_idx], layer_idx)
            if k.dtype != self._dtypes[layer_idx] or k.device != old.device:
                raise ValueError("k/v must have the cache's dtype and device")
        _check_finite("keys", k, layer_idx)
        _check_finite("values", v, layer_idx)
        return self._append(layer_idx, k, v)

    def _grow(self, layer_idx: int, k: Tensor, v: Tensor, needed: int) -> None:
        g = self.group_size
        buf_k = self._keys[layer_idx]
        current = 0 if buf_k is None else buf_k.shape[2]
        if needed <= current:
            return
        cap = -(-max(needed, 2 * current) // g) * g
        b, h, _, d = k.shape
        dv = v.shape[3]
        new = (k.new_zeros(b, h, cap, d, dtype=torch.int8),
               v.new_zeros(b, h, cap, dv, dtype=torch.int8),
               k.new_zeros(b, h, cap // g, d, dtype=torch.float32),
               v.new_zeros(b, h, cap, 1, dtype=torch.float32))
        if buf_k is not None:
            held = self._held[layer_idx]
            new[0][:, :, :current] = buf_k
            new[1][:, :, :held] = self._values[layer_idx][:, :, :held]
            new[2][:, :, :current // g] = self._key_scales[layer_idx]
            new[3][:, :, :held] = self._value_scales[layer_idx][:, :, :held]
        (self._keys[layer_idx], self._values[layer_idx],
         self._key_scales[layer_idx], self._value_scales[layer_idx]) = new
        self._dtypes[layer_idx] = k.dtype

    def _workspace(self, which: int, numel: int, like: Tensor) -> Tensor:
        w = self._work[which]
        if w is None or w.numel() < numel or w.dtype != like.dtype or w.device != like.device:
            w = like.new_empty(max(numel, 0 if w is None else 2 * w.numel()))
            self._work[which] = w
        return w[:numel]

    def _append(self, layer_idx, k, v):
        g = self.group_size
        b, h, n, d = k.shape
        dv = v.shape[3]
        held = self._held[layer_idx]
        self._grow(layer_idx, k, v, held + n)
        buf_k, buf_v = self._keys[layer_idx], self._values[layer_idx]
        k_scales, v_scales = self._key_scales[layer_idx], self._value_scales[layer_idx]
        # values: one scale per (position, head)
        qv, sv = _quantize(v, dim=3)
        buf_v[:, :, held:held + n] = qv
        v_scales[:, :, held:held + n] = sv
        # keys: the open group's positions plus the new ones; complete groups are quantised
        residual = self._residual[layer_idx]
        done = held - (0 if residual is None else residual.shape[2])  # quantised key positions
        pending = k if residual is None else torch.cat([residual, k], dim=2)
        full = pending.shape[2] // g
        if full:
            blocks = pending[:, :, :full * g].reshape(b, h, full, g, d)
            qk, sk = _quantize(blocks, dim=3)  # max over the group's positions, per channel
            buf_k[:, :, done:done + full * g] = qk.view(b, h, full * g, d)
            k_scales[:, :, done // g:done // g + full] = sk.squeeze(3)
            done += full * g
        rest = pending[:, :, full * g:]
        self._residual[layer_idx] = rest.clone() if rest.shape[2] else None
        total = held + n
        self._held[layer_idx] = total
        self._seen[layer_idx] += n
        # dequantise just before the kernel, into the shared workspace
        out_k = self._workspace(0, b * h * total * d, k).view(b, h, total, d)
        out_v = self._workspace(1, b * h * total * dv, v).view(b, h, total, dv)
        if done:
            nb = done // g
            torch.mul(buf_k[:, :, :done].view(b, h, nb, g, d),
                      k_scales[:, :, :nb, None, :].to(k.dtype),
                      out=out_k[:, :, :done].view(b, h, nb, g, d))
        if rest.shape[2]:
            out_k[:, :, done:] = rest
        torch.mul(buf_v[:, :, :total], v_scales[:, :, :total].to(v.dtype), out=out_v)
        return out_k, out_v

    def tensors(self) -> list[Tensor]:
        """The 8-bit codes, their scales and the residual keys (not the workspace)."""
        return [t for t in self._keys + self._values + self._key_scales + self._value_scales
                + self._residual if t is not None]

    @property
    def workspace_nbytes(self) -> int:
        """Bytes of the shared dequantisation workspace."""
        return sum(w.numel() * w.element_size() for w in self._work if w is not None)
