"""attnkit.nn.MultiheadAttention against torch.nn.MultiheadAttention (same state_dict, same
outputs and weights), and its attnkit extensions (pattern=, num_kv_heads=)."""

from __future__ import annotations

import pytest
import torch

from attnkit import dense_reference
from attnkit import patterns as P
from attnkit.nn import MultiheadAttention

E, H = 16, 4
TOL = dict(atol=1e-5, rtol=0)


def _pair(seed: int = 0, **kw):
    """A torch layer and an attnkit layer with the torch layer's state_dict, both in eval."""
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(E, H, **kw).eval()
    ours = MultiheadAttention(E, H, **kw).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _inputs(batch_first: bool, n=2, lq=5, s=7, kdim=E, vdim=E, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda length, f: (n, length, f)) if batch_first else (
        lambda length, f: (length, n, f))
    return (torch.randn(*shape(lq, E), generator=g), torch.randn(*shape(s, kdim), generator=g),
            torch.randn(*shape(s, vdim), generator=g))


def _compare(ref, ours, *args, **kw):
    out_r, w_r = ref(*args, **kw)
    out_o, w_o = ours(*args, **kw)
    torch.testing.assert_close(out_o, out_r, **TOL)
    if w_r is None:
        assert w_o is None
    else:
        assert w_o.shape == w_r.shape
        torch.testing.assert_close(w_o, w_r, **TOL)
    return out_o, w_o


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_cross_attention_equals_torch(batch_first, need_weights, average):
    ref, ours = _pair(batch_first=batch_first)
    q, k, v = _inputs(batch_first)
    _compare(ref, ours, q, k, v, need_weights=need_weights, average_attn_weights=average)


@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention_and_defaults_equal_torch(batch_first):
    ref, ours = _pair(batch_first=batch_first)
    x = _inputs(batch_first, lq=6)[0]
    _, w = _compare(ref, ours, x, x, x)  # need_weights=True by default, averaged
    assert w.shape == (2, 6, 6)


@pytest.mark.parametrize("batch_first", [False, True])
def test_kdim_vdim_separate_projections(batch_first):
    ref, ours = _pair(kdim=5, vdim=3, batch_first=batch_first)
    assert ours.in_proj_weight is None and ours.k_proj_weight.shape == (E, 5)
    assert set(ours.state_dict()) == set(ref.state_dict())
    q, k, v = _inputs(batch_first, kdim=5, vdim=3)
    _compare(ref, ours, q, k, v, average_attn_weights=False)


def test_no_bias():
    ref, ours = _pair(bias=False)
    assert ours.in_proj_bias is None and ours.out_proj.bias is None
    _compare(ref, ours, *_inputs(False))


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_masks_equal_torch(kind, batch_first):
    ref, ours = _pair(batch_first=batch_first)
    q, k, v = _inputs(batch_first)
    g = torch.Generator().manual_seed(5)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    pad[1, :2] = True
    am = torch.rand(5, 7, generator=g) < 0.3
    am[:, 2] = False  # every query keeps a key
    if kind == "float":
        pad = torch.zeros(2, 7).masked_fill(pad, float("-inf"))
        am = torch.randn(5, 7, generator=g)
    for kw in ({"key_padding_mask": pad}, {"attn_mask": am},
               {"key_padding_mask": pad, "attn_mask": am}):
        for need in (True, False):
            _compare(ref, ours, q, k, v, need_weights=need, **kw)


def test_3d_attn_mask_per_batch_and_head():
    ref, ours = _pair()
    q, k, v = _inputs(False)
    am = torch.randn(2 * H, 5, 7)
    _compare(ref, ours, q, k, v, attn_mask=am, average_attn_weights=False)
    keep = torch.rand(2 * H, 5, 7) < 0.7
    keep[..., 0] = True
    _compare(ref, ours, q, k, v, attn_mask=~keep, need_weights=False)


def test_masked_keys_get_zero_weight_bool_convention():
    """True in key_padding_mask means padding: those keys get no weight (torch's convention)."""
    _, ours = _pair()
    q, k, v = _inputs(True)
    ours.batch_first = True
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[:, 4:] = True
    _, w = ours(q, k, v, key_padding_mask=pad)
    assert bool((w[:, :, 4:] == 0).all()) and bool((w[:, :, :4] > 0).all())


def test_unbatched_inputs():
    ref, ours = _pair()
    q, k, v = (t[:, 0] for t in _inputs(False))
    pad = torch.tensor([False] * 6 + [True])
    out, w = _compare(ref, ours, q, k, v, key_padding_mask=pad)
    assert out.shape == (5, E) and w.shape == (5, 7)
    _compare(ref, ours, q, k, v, need_weights=True, average_attn_weights=False)


@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_with_attn_mask(need_weights):
    ref, ours = _pair(batch_first=True)
    x = _inputs(True, lq=6)[0]
    mask = torch.nn.Transformer.generate_square_subsequent_mask(6)
    _compare(ref, ours, x, x, x, attn_mask=mask, is_causal=True, need_weights=need_weights)
    # without attn_mask (torch raises) the causal mask itself is applied
    out, w = ours(x, x, x, is_causal=True)
    torch.testing.assert_close(out, ours(x, x, x, attn_mask=mask)[0], **TOL)
    assert bool((w.triu(1) == 0).all())


def test_add_bias_kv_and_zero_attn():
    ref, ours = _pair(add_bias_kv=True, add_zero_attn=True)
    q, k, v = _inputs(False)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 3:] = True
    _compare(ref, ours, q, k, v, key_padding_mask=pad, attn_mask=torch.rand(5, 7) < 0.2)


def test_dropout_zero_in_eval_and_active_in_training():
    ref, ours = _pair(dropout=0.5)
    q, k, v = _inputs(False)
    _compare(ref, ours, q, k, v)  # eval: no dropout
    ours.train()
    torch.manual_seed(0)
    a = ours(q, k, v, need_weights=False)[0]
    b = ours(q, k, v, need_weights=False)[0]
    assert not torch.allclose(a, b)


def test_gradients_equal_torch():
    ref, ours = _pair(batch_first=True)
    q, k, v = _inputs(True)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 6] = True
    ref(q, k, v, key_padding_mask=pad)[0].square().sum().backward()
    ours(q, k, v, key_padding_mask=pad)[0].square().sum().backward()
    for (name, pr), (_, po) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(po.grad, pr.grad, **TOL, msg=name)


def test_parameters_like_torch_and_device_dtype():
    ref = torch.nn.MultiheadAttention(E, H, kdim=3)
    ours = MultiheadAttention(E, H, kdim=3, dtype=torch.float64)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [
        (n, p.shape) for n, p in ref.named_parameters()]
    assert all(p.dtype == torch.float64 for p in ours.parameters())


def test_pattern_restricts_keys():
    torch.manual_seed(3)
    pat = P.sliding_window(2) | P.global_tokens([0])
    m = MultiheadAttention(E, H, batch_first=True, pattern=pat).double().eval()
    x = torch.randn(2, 12, E, dtype=torch.float64)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 10:] = True
    out, w = m(x, x, x, key_padding_mask=pad, average_attn_weights=False)
    # reference: the projections by hand, dense masked softmax with the pattern & padding
    q, k, v = torch.nn.functional.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, -1)
    heads = [t.view(2, 12, H, E // H).transpose(1, 2) for t in (q, k, v)]
    keep = pat.to_dense(12, 12).view(1, 1, 12, 12) & ~pad.view(2, 1, 1, 12)
    ref_o, ref_w = dense_reference(*heads, keep)
    ref_o = m.out_proj(ref_o.transpose(1, 2).reshape(2, 12, E))
    torch.testing.assert_close(out, ref_o, atol=1e-10, rtol=0)
    torch.testing.assert_close(w, ref_w, atol=1e-10, rtol=0)
    out2, none = m(x, x, x, need_weights=False)
    assert none is None and out2.shape == (2, 12, E)


def test_num_kv_heads_grouped_query():
    torch.manual_seed(4)
    m = MultiheadAttention(E, H, num_kv_heads=2, batch_first=True).double().eval()
    assert m.in_proj_weight is None and m.k_proj_weight.shape == (2 * E // H, E)
    x = torch.randn(2, 6, E, dtype=torch.float64)
    out, w = m(x, x, x, average_attn_weights=False)
    d = E // H
    q = (x @ m.q_proj_weight.T + m.in_proj_bias[:E]).view(2, 6, H, d).transpose(1, 2)
    k = (x @ m.k_proj_weight.T + m.in_proj_bias[E:E + 2 * d]).view(2, 6, 2, d).transpose(1, 2)
    v = (x @ m.v_proj_weight.T + m.in_proj_bias[E + 2 * d:]).view(2, 6, 2, d).transpose(1, 2)
    ref_o, ref_w = dense_reference(q, k, v)
    torch.testing.assert_close(out, m.out_proj(ref_o.transpose(1, 2).reshape(2, 6, E)),
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(w, ref_w, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [({"embed_dim": 10, "num_heads": 4}, ValueError, "divisible"),
     ({"embed_dim": 8, "num_heads": 0}, ValueError, "num_heads"),
     ({"embed_dim": 8, "num_heads": 4, "num_kv_heads": 3}, ValueError, "num_kv_heads"),
     ({"embed_dim": 8, "num_heads": 4, "dropout": 1.0}, ValueError, "dropout"),
     ({"embed_dim": 8, "num_heads": 4, "kdim": 0}, ValueError, "kdim"),
     ({"embed_dim": 8, "num_heads": 4, "pattern": "causal"}, TypeError, "pattern"),
     ({"embed_dim": 8, "num_heads": 4, "pattern": P.causal(), "add_zero_attn": True},
      ValueError, "add_zero_attn")],
)
def test_bad_constructor_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        MultiheadAttention(**kwargs)


def test_bad_forward_inputs():
    m = MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="8 features"):
        m(x, torch.randn(2, 5, 6), x)
    with pytest.raises(ValueError, match="all be 3-D"):
        m(x, x[0], x[0])
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        m(x, x, x, attn_mask=torch.zeros(3, 5, 5))
    with pytest.raises(TypeError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="L == S"):
        m(x, torch.randn(2, 4, 8), torch.randn(2, 4, 8), is_causal=True)
