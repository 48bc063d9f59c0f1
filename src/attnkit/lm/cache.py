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

``.nbytes`` is the size of the tensors the cache actually holds (capacity included).

A cache belongs to one sequence: :func:`attnkit.decoding.generate` refuses a cache that already
holds positions (``ValueError``); call :meth:`KVCache.reset` to reuse it for a new prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .patterns import Causal, Pattern, causal, sliding_window

__all__ = ["KVCache", "DynamicCache", "StaticCache", "SlidingWindowCache"]


def _check_kv(k: Tensor, v: Tensor) -> None:
    if not isinstance(k, Tensor) or not isinstance(v, Tensor):
        raise TypeError("k and v must be tensors of shape (B, Hkv, L, D)")
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must have shapes (B, Hkv, L, D) and (B, Hkv, L, Dv), got "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
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
            ov = self._values[layer_idx]
            if (k.shape[0], k.shape[1], k.shape[3]) != (old.shape[0], old.shape[1], old.shape[3]) \
                    or v.shape[3] != ov.shape[3]:
                raise ValueError(
                    f"k/v of shape {tuple(k.shape)}/{tuple(v.shape)} do not match the cached "
                    f"(B, Hkv, *, D) = {tuple(old.shape)}/{tuple(ov.shape)} of layer {layer_idx}"
                )
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
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
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


class DynamicCache(_BufferCache):
    """Grows without bound; capacity doubles when full (at most 2x the used positions)."""

    def _capacity_for(self, layer_idx, needed, current):
        return max(needed, 2 * current, 16)


class StaticCache(_BufferCache):
    """Preallocates ``max_len`` positions per layer on first use; overflowing raises."""

    def __init__(self, max_len: int):
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
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
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
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
