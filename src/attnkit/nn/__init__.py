"""Thin ``nn.Module`` layers over the engine (:func:`attnkit.attention`).

Imported lazily so each layer's file stands alone.
"""

from __future__ import annotations

import importlib

_LAYERS = {
    "MultiheadAttention": "attnkit.nn.mha",
    "SelfAttention": "attnkit.nn.attention",
    "RotaryEmbedding": "attnkit.nn.attention",
    "AxialAttention": "attnkit.nn.axial",
    "CrossAttention": "attnkit.nn.cross",
    "GraphAttention": "attnkit.nn.graph",
}

__all__ = sorted(_LAYERS)


def __getattr__(name: str):
    if name in _LAYERS:
        return getattr(importlib.import_module(_LAYERS[name]), name)
    raise AttributeError(f"module 'attnkit.nn' has no attribute {name!r}")
