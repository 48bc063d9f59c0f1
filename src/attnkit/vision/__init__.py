"""Vision Transformer on the attention engine, and a probe of its brightness invariance."""

from __future__ import annotations

from .data import load_digits, load_images
from .model import ViT
from .probe import ProbeResult, brightness_probe, js_divergence

__all__ = ["ViT", "load_digits", "load_images", "brightness_probe", "ProbeResult",
           "js_divergence"]
