"""Moved: generation and decoding measurements live in :mod:`attnkit.lm` (``attnkit.lm.generate``
etc., defined in ``attnkit/lm/decoding.py``; training, uptraining and the MHA -> GQA/MQA
conversion in ``attnkit/lm/training.py``). This module keeps the old import path working."""

from .lm.decoding import (
    bits_per_char_cached,
    decode_roofline,
    generate,
    kv_bytes_per_token,
    kv_cache_bytes,
    measure_bandwidth,
    time_per_token,
    weight_bytes,
)
from .lm.training import convert_kv_heads, train_lm, uptrain

__all__ = [
    "generate",
    "convert_kv_heads",
    "train_lm",
    "uptrain",
    "kv_cache_bytes",
    "kv_bytes_per_token",
    "bits_per_char_cached",
    "weight_bytes",
    "decode_roofline",
    "measure_bandwidth",
    "time_per_token",
]
