"""Moved: the language model lives in :mod:`attnkit.lm` (``attnkit.lm.DecoderLM``, defined in
``attnkit/lm/model.py``). This module keeps the old import path working."""

from .lm.model import DecoderBlock, DecoderLM, GeluMLP

__all__ = ["DecoderLM", "DecoderBlock", "GeluMLP"]
