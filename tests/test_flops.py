"""attnkit.flops.count against hand formulas and torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from attnkit import patterns as P
from attnkit.cache import DynamicCache, SlidingWindowCache
from attnkit.flops import attention_core_flops, count
from attnkit.models import DecoderLM
from attnkit.nn import SelfAttention

B, L, DIM = 2, 16, 32


def _projection_flops(b, length, dim, heads, kv_heads, head_dim):
    tokens = b * length
    q = out = 2 * dim * heads * head_dim * tokens
    k = v = 2 * dim * kv_heads * head_dim * tokens
    return q + k + v + out


@pytest.mark.parametrize(
    "pattern,allowed_pairs",
    [
        (None, L * L),
        (P.causal(), L * (L + 1) // 2),
        # each query sees itself and the 3 previous positions (fewer at the start)
        (P.causal() & P.sliding_window(3), sum(min(i + 1, 4) for i in range(L))),
        # symmetric window of 2: |i - j| <= 2
        (P.sliding_window(2), sum(min(i, 2) + min(L - 1 - i, 2) + 1 for i in range(L))),
    ],
)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_module_matches_hand_formula(pattern, allowed_pairs, heads, kv_heads):
    m = SelfAttention(DIM, heads, kv_heads, pattern=pattern)
    hd = DIM // heads
    r = count(m, torch.randn(B, L, DIM))
    core = 2 * B * heads * allowed_pairs * (hd + hd)  # q.k and weights @ v per allowed pair
    proj = _projection_flops(B, L, DIM, heads, kv_heads, hd)
    assert r.attention == core
    assert r.linear == proj
    assert r.total == core + proj
    assert r.by_module[""].flops == r.total
    assert r.by_module["k_proj"].flops == 2 * DIM * kv_heads * hd * B * L  # GQA: smaller K/V
    assert r.params == sum(p.numel() for p in m.parameters())


def test_causal_is_about_half_of_dense():
    dense = count(SelfAttention(DIM, 4, pattern=None), torch.randn(1, 256, DIM))
    causal = count(SelfAttention(DIM, 4, pattern=P.causal()), torch.randn(1, 256, DIM))
    assert causal.attention / dense.attention == pytest.approx(257 / 512)


def test_decoder_lm_totals_and_rollup():
    torch.manual_seed(0)
    vocab, depth, heads = 50, 2, 4
    lm = DecoderLM(vocab, DIM, depth, heads)
    ids = torch.randint(0, vocab, (B, L))
    r = count(lm, ids)
    hd = DIM // heads
    per_block = (_projection_flops(B, L, DIM, heads, heads, hd)
                 + 2 * B * heads * (L * (L + 1) // 2) * 2 * hd
                 + 2 * 2 * DIM * 4 * DIM * B * L)  # MLP: dim -> 4 dim -> dim
    head = 2 * DIM * vocab * B * L
    assert r.total == depth * per_block + head
    assert r.by_module["blocks.0"].flops == per_block
    assert r.by_module["blocks"].flops == depth * per_block
    # tied embedding/output weight counted once in the model total
    assert r.params == sum(p.numel() for p in lm.parameters())
    assert r.params < sum(c.params for n, c in r.by_module.items() if n in ("embed", "head",
                                                                          "blocks", "norm"))
    assert "blocks.0.attn" in str(r)


def test_cached_decoding_step_counts_the_cached_keys():
    m = SelfAttention(DIM, 4, 2, pattern=P.causal())
    cache = DynamicCache()
    count(m, torch.randn(1, 10, DIM), cache=cache)
    step = count(m, torch.randn(1, 1, DIM), cache=cache)
    # one query against 11 keys
    assert step.attention == attention_core_flops(1, 4, 1, 11, DIM // 4)


def test_sliding_window_cache_step_counts_only_the_window():
    window = 4
    m = SelfAttention(DIM, 4, pattern=P.causal() & P.sliding_window(window))
    cache = SlidingWindowCache(window)
    prefill = count(m, torch.randn(1, 10, DIM), cache=cache)
    assert prefill.attention == attention_core_flops(
        1, 4, 10, 10, DIM // 4, pattern=P.causal() & P.sliding_window(window))
    step = count(m, torch.randn(1, 1, DIM), cache=cache)
    # the cache holds the last 4 positions; the new query sees them and itself
    assert step.attention == attention_core_flops(1, 4, 1, window + 1, DIM // 4)


def _torch_linear_flops(model, *inputs):
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            model(*inputs)
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    linear = counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)
    return fc.get_total_flops(), linear


@pytest.mark.parametrize("pattern", [None, P.causal()])
def test_linear_flops_agree_with_torch_flop_counter(pattern):
    torch.manual_seed(0)
    lm = DecoderLM(50, DIM, 2, 4, 2) if pattern is not None else nn.Sequential(
        nn.Linear(DIM, 64), nn.GELU(), nn.Linear(64, DIM))
    x = torch.randint(0, 50, (B, L)) if pattern is not None else torch.randn(B, L, DIM)
    r = count(lm, x)
    _, torch_linear = _torch_linear_flops(lm, x)
    assert torch_linear == r.linear


def test_torch_flop_counter_gets_causal_attention_wrong():
    """torch either misses the attention core (the SDPA call on CPU) or charges it for every
    Lq x Lk pair; either way it differs from the causal count, which is about half of dense."""
    torch.manual_seed(0)
    m = SelfAttention(DIM, 4, pattern=P.causal())
    x = torch.randn(B, 64, DIM)
    r = count(m, x)
    torch_total, torch_linear = _torch_linear_flops(m, x)
    torch_attention = torch_total - torch_linear
    dense = attention_core_flops(B, 4, 64, 64, DIM // 4)
    assert torch_attention in (0, dense)
    assert r.attention == attention_core_flops(B, 4, 64, 64, DIM // 4, pattern=P.causal())
    assert r.attention < 0.51 * dense


@pytest.mark.parametrize("fused", [False, True])
def test_torch_flop_counter_gets_sliding_window_wrong(fused, monkeypatch):
    """The engine's PyTorch band kernel evaluates a window in dense blocks: torch counts the
    blocks' matmuls, many more than the allowed pairs. The fused compiled kernel (fp32 on CPU)
    is invisible to torch's counter: it counts nothing for the attention core."""
    from attnkit.kernels import native

    if fused and not native.band_available():
        pytest.skip("no fused band kernel here (no C compiler)")
    if not fused:
        monkeypatch.setitem(native._state, "ok", False)
    m = SelfAttention(DIM, 4, pattern=P.causal() & P.sliding_window(4))
    x = torch.randn(B, 64, DIM)
    r = count(m, x)
    torch_total, torch_linear = _torch_linear_flops(m, x)
    assert torch_linear == r.linear
    if fused:
        assert torch_total == torch_linear and r.attention > 0
    else:
        assert torch_total - torch_linear > r.attention


def test_bad_model_type():
    with pytest.raises(TypeError, match="nn.Module"):
        count(lambda x: x, torch.zeros(1))
