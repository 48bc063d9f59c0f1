"""SelfAttention (MHA/GQA/MQA) and RotaryEmbedding against plain dense references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import dense_reference
from attnkit import patterns as P
from attnkit.cache import DynamicCache
from attnkit.nn import RotaryEmbedding, SelfAttention


def _reference_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0):
    """Rotate-half RoPE written from the definition: pair (i, i + D/2) rotated by p*theta_i."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * theta[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _reference_mha(m: SelfAttention, x: torch.Tensor, mask: torch.Tensor | None,
                   head_mask: torch.Tensor | None = None):
    b, n, _ = x.shape
    h, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    q = m.q_proj(x).view(b, n, h, d).transpose(1, 2)
    k = m.k_proj(x).view(b, n, hkv, d).transpose(1, 2)
    v = m.v_proj(x).view(b, n, hkv, d).transpose(1, 2)
    if m.rotary is not None:
        pos = torch.arange(n)
        q, k = _reference_rope(q, pos), _reference_rope(k, pos)
    out, w = dense_reference(q, k, v, mask)
    if head_mask is not None:
        out = out * head_mask.view(1, h, 1, 1)
    return m.out_proj(out.transpose(1, 2).reshape(b, n, h * d)), w


@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("pattern", [None, P.causal(), P.causal() & P.sliding_window(3)])
def test_mha_matches_dense_reference(kv, rope, pattern):
    torch.manual_seed(0)
    m = SelfAttention(32, 4, kv, pattern=pattern, qkv_bias=True, rope=rope).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    mask = None if pattern is None else pattern.to_dense(11, 11)
    out, w = m(x, need_weights=True)
    ref_out, ref_w = _reference_mha(m, x, mask)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    dense_w = w.to_dense() if hasattr(w, "to_dense") else w
    torch.testing.assert_close(dense_w, ref_w, atol=1e-10, rtol=0)
    assert m.k_proj.out_features == kv * m.head_dim == m.v_proj.out_features


def test_head_mask_gates_each_head():
    torch.manual_seed(1)
    m = SelfAttention(24, 3, 1, pattern=P.causal()).double()
    x = torch.randn(1, 7, 24, dtype=torch.float64)
    gate = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64, requires_grad=True)
    out = m(x, head_mask=gate)
    ref, _ = _reference_mha(m, x, P.causal().to_dense(7, 7), gate)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    out.square().sum().backward()
    assert gate.grad is not None and bool(gate.grad.ne(0).all())
    with pytest.raises(ValueError, match="head_mask"):
        m(x, head_mask=torch.ones(4))


def test_mha_gradcheck():
    torch.manual_seed(2)
    m = SelfAttention(8, 2, 1, pattern=P.causal()).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 24),
    offset=st.integers(0, 3000),
    half_d=st.integers(1, 8),
)
def test_rope_matches_definition(n, offset, half_d):
    d = 2 * half_d
    rope = RotaryEmbedding(d)
    x = torch.randn(2, 3, n, d, dtype=torch.float64)
    pos = torch.arange(offset, offset + n)
    torch.testing.assert_close(rope(x, offset), _reference_rope(x, pos), atol=1e-9, rtol=0)
    # a rotation: norms are unchanged
    torch.testing.assert_close(rope(x, offset).norm(dim=-1), x.norm(dim=-1))


def test_rope_consistent_across_steps():
    """Rotating a sequence at once equals rotating it token by token with growing offsets, and
    scores depend only on relative position."""
    rope = RotaryEmbedding(16)
    x = torch.randn(1, 2, 40, 16)
    whole = rope(x)
    steps = torch.cat([rope(x[:, :, i:i + 1], i) for i in range(40)], dim=2)
    torch.testing.assert_close(steps, whole, atol=1e-6, rtol=0)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    rope64 = RotaryEmbedding(16).double()

    def score(i, j):
        qi = rope64(q.view(1, 1, 1, 16), i)
        kj = rope64(k.view(1, 1, 1, 16), j)
        return float((qi * kj).sum())

    assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-9)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-6)


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_mha_cached_steps_match_full(kv):
    torch.manual_seed(3)
    m = SelfAttention(32, 4, kv, pattern=P.causal()).double()
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    cache = DynamicCache()
    parts = [m(x[:, :5], cache=cache)] + [m(x[:, i:i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), m(x), atol=1e-5, rtol=0)


def test_rope_against_transformers():
    tr = pytest.importorskip("transformers.models.llama.modeling_llama")
    d, n = 16, 9
    q, k = torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    theta = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    ang = torch.outer(torch.arange(n).float(), theta)
    emb = torch.cat([ang, ang], -1)
    hq, hk = tr.apply_rotary_pos_emb(q, k, emb.cos()[None], emb.sin()[None])
    rope = RotaryEmbedding(d)
    torch.testing.assert_close(rope(q), hq, atol=1e-5, rtol=0)
    torch.testing.assert_close(rope(k), hk, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "args, match",
    [((32, 4, 3), "divide"), ((32, 5), "divisible"), ((32, 4, 0), "num_kv_heads"),
     ((0, 4), "dim"), ((32, 4, 8), "divide")],
)
def test_bad_constructor_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        SelfAttention(*args)


def test_bad_forward_inputs():
    m = SelfAttention(16, 4)
    with pytest.raises(ValueError, match=r"\(B, L, 16\)"):
        m(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="at least one"):
        m(torch.randn(2, 0, 16))
    with pytest.raises(ValueError):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="offset"):
        RotaryEmbedding(8)(torch.randn(1, 1, 2, 8), -1)


def test_partial_rotary_rotates_only_the_first_channels():
    rope = RotaryEmbedding(10, rotary_dims=4)
    x = torch.randn(2, 3, 7, 10, dtype=torch.float64)
    pos = torch.arange(100, 107)
    out = rope(x, 100)
    torch.testing.assert_close(out[..., :4], _reference_rope(x[..., :4], pos), atol=1e-9, rtol=0)
    assert torch.equal(out[..., 4:], x[..., 4:])
    cos, sin = rope.tables(100, 107, x.device, x.dtype)  # fresh tables equal the cached ones
    torch.testing.assert_close((cos, sin), rope.cos_sin(100, 107, x.device, x.dtype))
    with pytest.raises(ValueError, match="rotary_dims"):
        RotaryEmbedding(8, rotary_dims=3)
    with pytest.raises(ValueError, match="rotary_dims"):
        RotaryEmbedding(8, rotary_dims=10)


def test_self_attention_qkv_and_merge_compose_forward():
    """qkv() + the engine + merge() is forward() (what models calling the engine use)."""
    torch.manual_seed(5)
    m = SelfAttention(24, 3, 1, pattern=P.causal(), qkv_bias=True, rotary_dims=4).double()
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    from attnkit import attention

    q, k, v = m.qkv(x)
    assert q.shape == (2, 3, 9, 8) and k.shape == (2, 1, 9, 8)
    torch.testing.assert_close(m.merge(attention(q, k, v, pattern=P.causal())), m(x),
                               atol=1e-12, rtol=0)
    rope = m.rotary.tables(0, 9, x.device, x.dtype)
    torch.testing.assert_close(m.qkv(x, rope_tables=rope)[0], q, atol=1e-12, rtol=0)
