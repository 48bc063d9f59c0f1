"""The short-sequence kernels (attnkit.kernels.short / short_cpu.c) against dense fp64 references.

They serve dense calls on CPU with short sequences (see SHORT_MAX_LEN), fp32 or fp64, no bias,
mask or dropout, read q/k/v through their strides with any number of batch dims, and write
gradients laid out like their inputs (one packed buffer for a packed projection). Each test
checks the path was really taken. (ATTNKIT_NATIVE=0 is tested for every kernel in
test_native_band.py.)
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit.kernels.short as short
from attnkit import attention, dense_reference
from attnkit.kernels import native
from attnkit.nn.axial import unbind_packed

HAS_CC = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
pytestmark = [
    pytest.mark.skipif(not HAS_CC, reason="no C compiler: the native kernels are optional"),
    pytest.mark.skipif(native._native_disabled(), reason="ATTNKIT_NATIVE=0: kernels turned off"),
]
F64 = torch.float64


@pytest.fixture()
def calls(monkeypatch):
    """Count calls of the short-sequence path (and fail loudly if it is unavailable)."""
    assert native.short_available(), "a C compiler exists, so the kernel must build"
    seen = []
    real = short.short_attention

    def spy(q, k, v, scale):
        seen.append(tuple(q.shape))
        return real(q, k, v, scale)

    monkeypatch.setattr(short, "short_attention", spy)
    import attnkit.functional as functional

    monkeypatch.setattr(functional, "short_attention", spy)
    return seen


def _reference(q, k, v, scale):
    """Dense fp64 attention of (*batch, H, L, D) inputs, GQA by repeating k/v heads."""
    g = q.shape[-3] // k.shape[-3]
    k, v = (t.double().repeat_interleave(g, -3) for t in (k, v))
    s = scale * q.double() @ k.transpose(-1, -2)
    return torch.softmax(s, -1) @ v


def _grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, dout)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    hkv=st.integers(1, 3),
    groups=st.integers(1, 3),
    lq=st.integers(1, 40),
    lk=st.integers(1, 40),
    d=st.sampled_from([1, 5, 8, 16, 19]),
    dv=st.sampled_from([2, 8, 13, 32]),
    dtype=st.sampled_from([torch.float32, F64]),
    seed=st.integers(0, 2**16),
)
def test_forward_and_gradients_match_fp64(batch, hkv, groups, lq, lk, d, dv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hq = hkv * groups
    q = torch.randn(*batch, hq, lq, d, generator=g, dtype=dtype)
    k = torch.randn(*batch, hkv, lk, d, generator=g, dtype=dtype)
    v = torch.randn(*batch, hkv, lk, dv, generator=g, dtype=dtype)
    dout = torch.randn(*batch, hq, lq, dv, generator=g, dtype=dtype)
    scale = d ** -0.5
    out, grads = _grads(lambda *t: short.short_attention(*t, scale), (q, k, v), dout)
    ref, ref_grads = _grads(lambda *t: _reference(*t, scale), (q, k, v), dout.double())
    tol = 1e-12 if dtype == F64 else 2e-5
    assert out.dtype == dtype and out.shape == ref.shape
    assert (out.double() - ref).abs().max() <= tol * 10
    for a, b in zip(grads, ref_grads):
        assert (a.double() - b).abs().max() <= tol * 10 * max(1.0, b.abs().max().item())


def test_gradcheck_fp64_through_the_engine(calls):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 2, 5, 3, dtype=F64, generator=g, requires_grad=True)
    k = torch.randn(3, 1, 6, 3, dtype=F64, generator=g, requires_grad=True)
    v = torch.randn(3, 1, 6, 4, dtype=F64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, temperature=0.7),
                                    (q, k, v))
    assert calls


def test_engine_takes_it_for_short_dense_calls_only(calls):
    q = torch.randn(4, 2, 16, 8)
    attention(q, q, q)
    assert len(calls) == 1
    attention(q, q, q, bias=torch.zeros(16, 16))  # a bias: SDPA
    attention(q, q, q, return_weights=True)  # weights: the dense path
    attention(torch.randn(4, 2, 200, 8), torch.randn(4, 2, 200, 8), torch.randn(4, 2, 200, 8))
    wide = torch.randn(4, 2, 100, 32)  # 100 long with 32 channels: SDPA is faster there
    attention(wide, wide, wide)
    assert len(calls) == 1
    narrow = torch.randn(4, 2, 100, 16)  # 100 long with 16 channels: the kernel
    attention(narrow, narrow, narrow)
    assert len(calls) == 2


def test_extreme_logits_are_stable(calls):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 9, 4, generator=g) * 300 for _ in range(3))
    out = attention(q, k, v)
    assert calls and torch.isfinite(out).all()
    assert (out.double() - _reference(q, k, v, 0.5)).abs().max() < 1e-3


def test_strided_views_of_a_packed_projection_are_read_in_place(calls):
    """q, k, v as views (B, *other axes, H, L, d) of a (B, X, Y, Z, 3, H, d) projection along
    each axis: the same result as contiguous copies, output in voxel order, and the gradient
    of the packed tensor comes back packed (no stacking copy) and exact."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 5, 6, 7, 3, 2, 8, generator=g, dtype=F64)
    for axis in range(3):
        qkv = base.clone().requires_grad_()
        q, k, v = (t.movedim(axis + 1, -2) for t in unbind_packed(qkv, -3))
        out = attention(q, k, v)
        ref = _reference(q.contiguous(), k.contiguous(), v.contiguous(), 8 ** -0.5)
        assert (out - ref).abs().max() < 1e-12
        assert out.movedim(-2, axis + 1).is_contiguous()  # voxel order, like q
        dout = torch.randn(out.shape, generator=g, dtype=F64)
        out.backward(dout)
        leaf = base.clone().requires_grad_()
        qr, kr, vr = (t.movedim(axis + 1, -2) for t in leaf.unbind(-3))
        _reference(qr, kr, vr, 8 ** -0.5).backward(dout)
        assert (qkv.grad - leaf.grad).abs().max() < 1e-12


def test_packed_gradient_is_the_kernels_own_buffer(calls, monkeypatch):
    stacked = []
    real = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **kw: stacked.append(1) or real(*a, **kw))
    qkv = torch.randn(4, 10, 3, 2, 8, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in unbind_packed(qkv, 2))
    attention(q, k, v).sum().backward()
    assert not stacked and qkv.grad.is_contiguous()


def test_unbind_packed_with_unused_or_unpacked_gradients():
    x = torch.randn(4, 3, 5, requires_grad=True)
    a, b, c = unbind_packed(x, 1)
    (a * 2 + c).sum().backward()  # b unused; separate gradient buffers
    expect = torch.zeros(4, 3, 5)
    expect[:, 0] = 2
    expect[:, 2] = 1
    assert torch.equal(x.grad, expect)


def test_self_attention_on_one_tensor_gets_separate_gradients(calls):
    """q = k = v = x: the inputs overlap, so the gradients must not share a buffer."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 7, 5, generator=g, dtype=F64, requires_grad=True)
    attention(x, x, x).square().sum().backward()
    leaf = x.detach().clone().requires_grad_()
    _reference(leaf, leaf, leaf, 5 ** -0.5).square().sum().backward()
    assert calls and (x.grad - leaf.grad).abs().max() < 1e-11


def test_non_contiguous_channels_are_copied_not_misread(calls):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 2, 6, 8, generator=g).transpose(-1, -2)  # (3, 2, 8, 6), channel stride 8
    out = attention(q, q, q)
    assert (out.double() - _reference(q, q, q, 6 ** -0.5)).abs().max() < 1e-5


def test_several_batch_dims_on_other_paths_match_flattened_calls():
    """Calls the short kernel does not take (a bias, long sequences, weights) flatten the batch
    dims and shape the results back."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 3, 2, 20, 4, generator=g, dtype=F64)
    k = torch.randn(2, 3, 2, 20, 4, generator=g, dtype=F64)
    v = torch.randn(2, 3, 2, 20, 6, generator=g, dtype=F64)
    bias = torch.randn(3, 1, 20, 20, generator=g, dtype=F64)
    out, w = attention(q, k, v, bias=bias, return_weights=True)
    flat = [t.reshape(6, 2, 20, -1) for t in (q, k, v)]
    ref = dense_reference(*flat, bias=bias.expand(2, 3, 2, 20, 20).reshape(6, 2, 20, 20))
    assert out.shape == (2, 3, 2, 20, 6) and w.shape == (2, 3, 2, 20, 20)
    assert (out.reshape(6, 2, 20, 6) - ref[0]).abs().max() < 1e-12
    assert (w.reshape(6, 2, 20, 20) - ref[1]).abs().max() < 1e-12


def test_bad_batch_dims_are_named():
    q = torch.randn(2, 3, 2, 5, 4)
    with pytest.raises(ValueError, match="batch sizes differ"):
        attention(q, torch.randn(2, 4, 2, 5, 4), torch.randn(2, 4, 2, 5, 4))
    with pytest.raises(ValueError, match="batch sizes differ"):
        attention(q, torch.randn(6, 2, 5, 4), torch.randn(6, 2, 5, 4))


def test_failed_self_check_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(native, "_short_state", {})

    def broken():
        raise RuntimeError("self-check against autograd failed")

    monkeypatch.setattr(native, "_short_self_check", broken)
    with pytest.warns(RuntimeWarning, match="short-sequence attention kernel unavailable"):
        assert native.short_available() is False
    q = torch.randn(4, 2, 8, 4, dtype=F64)
    assert (attention(q, q, q) - _reference(q, q, q, 0.5)).abs().max() < 1e-12


def test_broadcast_keys_and_values_get_summed_gradients(calls):
    """k/v expanded over the batch (stride 0) are read in place; their gradients are summed by
    the expand's backward."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(4, 2, 6, 5, generator=g, dtype=F64, requires_grad=True)
    k0 = torch.randn(1, 2, 7, 5, generator=g, dtype=F64, requires_grad=True)
    v0 = torch.randn(1, 2, 7, 3, generator=g, dtype=F64, requires_grad=True)
    out = attention(q, k0.expand(4, -1, -1, -1), v0.expand(4, -1, -1, -1))
    out.square().sum().backward()
    leaves = [t.detach().clone().requires_grad_() for t in (q, k0, v0)]
    _reference(leaves[0], leaves[1].expand(4, -1, -1, -1), leaves[2].expand(4, -1, -1, -1),
               5 ** -0.5).square().sum().backward()
    assert calls
    for a, b in zip((q, k0, v0), leaves):
        assert (a.grad - b.grad).abs().max() < 1e-12


def test_raw_kernels_validate_what_they_read():
    """short_forward / short_backward check shapes, dtypes and devices before any pointer is
    handed to C (unequal batch dims used to make the kernel read offsets past their array)."""
    assert native.short_available()
    q = torch.randn(4, 2, 6, 5, dtype=F64)
    k, v = torch.randn(4, 1, 7, 5, dtype=F64), torch.randn(4, 1, 7, 3, dtype=F64)
    with pytest.raises(ValueError, match="equal batch dims"):
        native.short_forward(q, k[:2], v[:2], 0.5)
    with pytest.raises(ValueError, match="equal batch dims"):
        native.short_forward(q, k, v[:, :, :6], 0.5)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        native.short_forward(q, torch.randn(4, 3, 7, 5, dtype=F64),
                             torch.randn(4, 3, 7, 3, dtype=F64), 0.5)
    with pytest.raises(TypeError, match="k must be torch.float64"):
        native.short_forward(q, k.float(), v, 0.5)
    with pytest.raises(TypeError, match="q must be torch.float32 or torch.float64"):
        native.short_forward(q.half(), k.half(), v.half(), 0.5)
    with pytest.raises(ValueError, match="scale must be finite"):
        native.short_forward(q, k, v, float("nan"))
    out, lse = native.short_forward(q, k, v, 0.5)
    with pytest.raises(ValueError, match="dout must have shape"):
        native.short_backward(q, k, v, out[:, :, :5], lse, 0.5)
    with pytest.raises(ValueError, match="lse must have shape"):
        native.short_backward(q, k, v, out, lse[:2], 0.5)
    empty = native.short_forward(q[:0], k[:0], v[:0], 0.5)  # no sequence: the empty result
    assert empty[0].shape == (0, 2, 6, 3) and empty[1].shape == (0, 2, 6)
