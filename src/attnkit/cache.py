"""Moved: the key/value caches live in :mod:`attnkit.lm` (``attnkit/lm/cache.py``). This module
keeps the old import path working."""

from .lm.cache import DynamicCache, KVCache, QuantizedCache, SlidingWindowCache, StaticCache

__all__ = ["KVCache", "DynamicCache", "StaticCache", "SlidingWindowCache", "QuantizedCache"]
