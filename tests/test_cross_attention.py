"""CrossAttention equals a plain dense computation with padding masks (fp64), and its gradients
pass gradcheck."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import dense_reference
from attnkit.nn import CrossAttention


def _reference(layer: CrossAttention, x, context, mask):
    """Plain per-batch dense computation with the layer's own projections."""
    B, lq, _ = x.shape
    h, d = layer.num_heads, layer.head_dim
    q = layer.to_q(x).view(B, lq, h, d).transpose(1, 2)
    kv = layer.to_kv(context).view(B, context.shape[1], 2, h, d)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    outs, ws = [], []
    for b in range(B):  # one batch element at a time so the mask is a plain (Lq, Lk) matrix
        m = mask[b].expand(lq, -1)
        o, w = dense_reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], m)
        outs.append(o)
        ws.append(w)
    out = torch.cat(outs).transpose(1, 2).reshape(B, lq, h * d)
    return layer.to_out(out), torch.cat(ws)


def _random_mask(B: int, lk: int, gen: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, lk + 1, (B,), generator=gen)
    return torch.arange(lk).unsqueeze(0) < lengths.unsqueeze(1)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), lq=st.integers(1, 5), lk=st.integers(1, 9),
       heads=st.sampled_from([1, 2, 4]), seed=st.integers(0, 10_000))
def test_matches_dense_reference_with_padding(B, lq, lk, heads, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = CrossAttention(8, 5, heads, head_dim=3, out_dim=6).double()
    x = torch.randn(B, lq, 8, dtype=torch.float64, generator=gen)
    ctx = torch.randn(B, lk, 5, dtype=torch.float64, generator=gen)
    mask = _random_mask(B, lk, gen)
    out, w = layer(x, ctx, key_padding_mask=~mask, return_weights=True)
    ref_out, ref_w = _reference(layer, x, ctx, mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-10)
    assert bool((w.masked_select(~mask.view(B, 1, 1, lk).expand_as(w)) == 0).all())
    # the fast path (no weights requested) gives the same output
    torch.testing.assert_close(layer(x, ctx, key_padding_mask=~mask), ref_out, rtol=1e-10,
                               atol=1e-10)


def test_padding_does_not_change_output():
    torch.manual_seed(0)
    layer = CrossAttention(8, 4, 2).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    ctx = torch.randn(2, 5, 4, dtype=torch.float64)
    padded = torch.cat([ctx, torch.randn(2, 7, 4, dtype=torch.float64) * 100], 1)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, :5] = True
    torch.testing.assert_close(layer(x, padded, key_padding_mask=~mask), layer(x, ctx),
                               rtol=1e-12, atol=1e-12)


def test_gradcheck():
    torch.manual_seed(1)
    layer = CrossAttention(4, 3, 2).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)

    def f(x, ctx):
        out, w = layer(x, ctx, key_padding_mask=~mask, return_weights=True)
        return out, w

    assert torch.autograd.gradcheck(f, (x, ctx), eps=1e-6, atol=1e-6)


def test_bad_input():
    layer = CrossAttention(8, 4, 2, max_context_len=10)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="batch sizes differ"):
        layer(x, torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match="context must have shape"):
        layer(x, torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(3, 8), ctx)
    with pytest.raises(ValueError, match="max_context_len"):
        layer(x, torch.randn(2, 11, 4))
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer(x, ctx, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        layer(x, ctx, key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="num_heads"):
        CrossAttention(8, 4, 0)
    with pytest.raises(ValueError, match="divisible"):
        CrossAttention(7, 4, 2)


def test_low_rank_bias_matches_explicit_bias():
    torch.manual_seed(2)
    layer = CrossAttention(8, 5, 2).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    ctx = torch.randn(2, 6, 5, dtype=torch.float64)
    qe = torch.randn(2, 2, 3, 2, dtype=torch.float64)
    ke = torch.randn(2, 2, 6, 2, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out, w = layer(x, ctx, key_padding_mask=~mask, low_rank_bias=(qe, ke),
                   return_weights=True)
    B, h, d = 2, 2, layer.head_dim
    q = layer.to_q(x).view(B, 3, h, d).transpose(1, 2)
    kv = layer.to_kv(ctx).view(B, 6, 2, h, d)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / d**0.5 + qe @ ke.transpose(-1, -2)
    ref_w = logits.masked_fill(~mask.view(B, 1, 1, 6), float("-inf")).softmax(-1)
    ref = layer.to_out((ref_w @ v).transpose(1, 2).reshape(B, 3, h * d))
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer(x, ctx, key_padding_mask=~mask, low_rank_bias=(qe, ke)), ref)
    with pytest.raises(ValueError, match="low_rank_bias"):
        layer(x, ctx, key_padding_mask=~mask, low_rank_bias=(qe, ke[:, :, :5]))


def test_context_mask_is_deprecated_and_equals_inverted_key_padding_mask():
    torch.manual_seed(3)
    layer = CrossAttention(8, 4, 2).double()
    x, ctx = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    real = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with pytest.warns(DeprecationWarning, match="key_padding_mask"):
        old = layer(x, ctx, real)
    with pytest.warns(DeprecationWarning):
        old_kw = layer(x, ctx, context_mask=real)
    new = layer(x, ctx, key_padding_mask=~real)
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    torch.testing.assert_close(old_kw, new, rtol=0, atol=0)
    # padded keys (True) get no weight
    _, w = layer(x, ctx, key_padding_mask=~real, return_weights=True)
    assert bool((w[0, :, :, 3:] == 0).all()) and bool((w[0, :, :, :3] > 0).all())
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="not both"):
        layer(x, ctx, real, key_padding_mask=~real)
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="context_mask"):
        layer(x, ctx, torch.ones(2, 5))
