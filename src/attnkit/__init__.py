"""attnkit: one exact, structure-aware scaled dot-product attention engine, and the scientific
applications built on it."""

from __future__ import annotations

import importlib

from . import patterns
from .functional import SparseWeights, attention, dense_reference

__version__ = "0.1.0"
__all__ = ["attention", "SparseWeights", "dense_reference", "patterns", "generate", "__version__"]

# Heavier pieces load on first use.
_LAZY = {"generate": "attnkit.lm.decoding"}  # home: attnkit.lm.generate


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attnkit' has no attribute {name!r}")
