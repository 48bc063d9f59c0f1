"""KV caches: cached decoding equals the uncached model, byte accounting, overflow and misuse."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.cache import DynamicCache, KVCache, SlidingWindowCache, StaticCache
from attnkit.decoding import kv_cache_bytes
from attnkit.models import DecoderLM

VOCAB, DIM, DEPTH, HEADS = 23, 24, 2, 4
KV_HEADS = [4, 2, 1]  # MHA, GQA, MQA


def _model(kv: int, window: int | None = None, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    model = DecoderLM(VOCAB, DIM, DEPTH, HEADS, kv, max_seq_len=64, window=window)
    # Larger weights than the default init so attention is far from uniform.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.double().eval()


def _run_chunks(model: DecoderLM, ids: torch.Tensor, cache: KVCache, chunks: list[int]):
    outs, pos = [], 0
    for n in chunks:
        outs.append(model(ids[:, pos:pos + n], cache=cache))
        pos += n
    assert pos == ids.shape[1]
    return torch.cat(outs, dim=1)


def _make(kind: str, length: int, window: int) -> KVCache:
    return {"dynamic": DynamicCache, "static": lambda: StaticCache(length),
            "sliding": lambda: SlidingWindowCache(window)}[kind]()


@pytest.mark.parametrize("kv", KV_HEADS)
@pytest.mark.parametrize("kind", ["dynamic", "static", "sliding"])
def test_cached_logits_equal_uncached(kind: str, kv: int):
    window = 5
    model = _model(kv, window=window if kind == "sliding" else None)
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    # a prompt, single decoding steps, a chunk longer than the window, more single steps
    chunks = [7] + [1] * 8 + [9] + [1] * 6
    got = _run_chunks(model, ids, _make(kind, 30, window), chunks)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


@settings(max_examples=12, deadline=None)
@given(
    kv=st.sampled_from(KV_HEADS),
    kind=st.sampled_from(["dynamic", "static", "sliding"]),
    window=st.integers(1, 8),
    chunks=st.lists(st.integers(1, 6), min_size=1, max_size=8),
)
def test_cached_logits_random_chunks(kv, kind, window, chunks):
    model = _model(kv, window=window if kind == "sliding" else None, seed=2)
    total = sum(chunks)
    ids = torch.randint(0, VOCAB, (1, total), generator=torch.Generator().manual_seed(total))
    got = _run_chunks(model, ids, _make(kind, total, window), chunks)
    torch.testing.assert_close(got, model(ids), atol=1e-5, rtol=0)


def test_sliding_window_cache_differs_from_full_attention():
    """The windowed model really forgets: its cached logits differ from an unwindowed model."""
    windowed, full = _model(2, window=3), _model(2)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    got = _run_chunks(windowed, ids, SlidingWindowCache(3), [4] + [1] * 16)
    assert (got[:, 5:] - full(ids)[:, 5:]).abs().max() > 1e-3


def _held_bytes(cache: KVCache) -> int:
    return sum(t.numel() * t.element_size() for t in cache.tensors())


def test_static_cache_bytes_match_tensors_and_formula():
    model = _model(2)
    cache = StaticCache(16)
    model(torch.randint(0, VOCAB, (3, 5)), cache=cache)
    hd = DIM // HEADS
    expected = DEPTH * 2 * 3 * 2 * 16 * hd * 8  # layers * (k, v) * B * Hkv * max_len * D * fp64
    assert cache.nbytes == _held_bytes(cache) == expected
    assert cache.nbytes == kv_cache_bytes(model, 16, batch=3)
    assert cache.seq_length(0) == 5 and cache.held_length(1) == 5


def test_dynamic_cache_bytes_and_capacity():
    model = _model(1)
    cache = DynamicCache()
    ids = torch.randint(0, VOCAB, (1, 40))
    model(ids[:, :20], cache=cache)
    for t in range(20, 40):
        model(ids[:, t:t + 1], cache=cache)
        used = kv_cache_bytes(model, t + 1)
        assert cache.nbytes == _held_bytes(cache)
        assert used <= cache.nbytes <= 2 * used  # doubling growth: at most 2x the used bytes


def test_sliding_cache_keeps_only_window():
    model = _model(4, window=6)
    cache = SlidingWindowCache(6)
    ids = torch.randint(0, VOCAB, (2, 25))
    model(ids[:, :10], cache=cache)
    for t in range(10, 25):
        model(ids[:, t:t + 1], cache=cache)
        assert cache.nbytes == _held_bytes(cache) == kv_cache_bytes(model, 6, batch=2)
    assert cache.seq_length(0) == 25 and cache.held_length(0) == 6


def test_reset_releases_everything():
    cache = StaticCache(8)
    cache.update(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    assert cache.nbytes > 0
    cache.reset()
    assert cache.nbytes == 0 and cache.seq_length(0) == 0 and cache.max_len == 8


def test_static_cache_overflow_raises():
    cache = StaticCache(4)
    k = torch.zeros(1, 1, 3, 8)
    cache.update(0, k, k)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, k, k)


def test_sliding_cache_rejects_other_patterns():
    model = _model(2)  # plain causal attention
    with pytest.raises(ValueError, match="sliding_window"):
        model(torch.randint(0, VOCAB, (1, 4)), cache=SlidingWindowCache(3))
    model = _model(2, window=4)
    with pytest.raises(ValueError, match="sliding_window"):
        model(torch.randint(0, VOCAB, (1, 4)), cache=SlidingWindowCache(3))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_cache_sizes(bad):
    with pytest.raises(ValueError):
        StaticCache(bad)
    with pytest.raises(ValueError):
        SlidingWindowCache(bad)


def test_update_shape_mismatch_raises():
    cache = DynamicCache()
    cache.update(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="do not match"):
        cache.update(0, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
    with pytest.raises(ValueError):
        cache.update(0, torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError):
        cache.update(-1, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
