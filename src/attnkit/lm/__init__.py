"""Language models on attnkit: the decoder-only model and its fused decoding step
(:mod:`.model`), key/value caches including the 8-bit one (:mod:`.cache`), generation and
decoding measurements (:mod:`.decoding`), training, uptraining and the MHA -> GQA/MQA
conversion (:mod:`.training`), character text data (:mod:`.text`), and the ``decoding``
experiment. (The ``pruning`` experiment studies the model-agnostic tools on this LM and on the
ViT, so it lives beside them in :mod:`attnkit.pruning_experiment`.)

``attnkit.generate``, ``attnkit.models``, ``attnkit.cache`` and ``attnkit.decoding`` re-export
the names that used to live there."""

from .cache import DynamicCache, KVCache, QuantizedCache, SlidingWindowCache, StaticCache
from .decoding import (
    bits_per_char_cached,
    decode_roofline,
    generate,
    kv_bytes_per_token,
    kv_cache_bytes,
    measure_bandwidth,
    time_per_token,
    weight_bytes,
)
from .model import DecoderBlock, DecoderLM, GeluMLP
from .text import CharTokenizer, Corpus, load_text_file, pydoc_corpus, split_text
from .training import convert_kv_heads, train_lm, uptrain

__all__ = [
    "DecoderLM", "DecoderBlock", "GeluMLP",
    "KVCache", "DynamicCache", "StaticCache", "SlidingWindowCache", "QuantizedCache",
    "generate", "kv_cache_bytes", "kv_bytes_per_token", "bits_per_char_cached", "weight_bytes",
    "decode_roofline", "measure_bandwidth", "time_per_token",
    "convert_kv_heads", "train_lm", "uptrain",
    "CharTokenizer", "Corpus", "load_text_file", "pydoc_corpus", "split_text",
]
