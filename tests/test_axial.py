"""AxialAttention equals dense attention with the axial mask (outputs, maps, gradients)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import dense_reference
from attnkit.nn import AxialAttention
from attnkit.nn.axial import axial_mask


def _dense_axis(module: AxialAttention, h, axis, valid):
    """One axis step as dense attention over all N voxels with the same-line mask."""
    B, spatial, C = h.shape[0], tuple(h.shape[1:-1]), h.shape[-1]
    N, H, d = h[0, ..., 0].numel(), module.num_heads, module.head_dim
    allowed = axial_mask(spatial, axis)  # (N, N)
    if valid is not None:
        allowed = allowed.unsqueeze(0) & valid.reshape(B, 1, N)  # keys must be valid
        allowed = allowed.unsqueeze(1)  # (B, 1, N, N)
    q, k, v = module.qkv[axis](h.reshape(B, N, C)).view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    bias = None
    if module.rel_pos is not None:
        coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in spatial], indexing="ij"),
                             -1).reshape(N, -1)[:, axis]
        md = module.rel_pos_max_distance
        offset = (coords[None, :] - coords[:, None]).clamp(-md, md) + md
        bias = module.rel_pos[axis][:, offset].unsqueeze(0).to(h.dtype)
    out, w = dense_reference(q, k, v, allowed, bias=bias)
    out = module.out[axis](out.transpose(1, 2).reshape(B, N, C)).view(*h.shape)
    return out, w  # w: (B, H, N, N)


def _dense_layer(module, x, valid=None):
    h = x if valid is None else x.masked_fill(~valid.unsqueeze(-1), 0.0)
    maps = []
    for axis in range(module.num_axes):
        h, w = _dense_axis(module, h, axis, valid)
        maps.append(w)
    if valid is not None:
        h = h.masked_fill(~valid.unsqueeze(-1), 0.0)
    return h, maps


def _module(dim, heads, axes, rel, seed=0, chunk=None):
    torch.manual_seed(seed)
    m = AxialAttention(dim, heads, axes, chunk, rel_pos_max_distance=rel).double()
    if m.rel_pos is not None:
        for p in m.rel_pos:
            torch.nn.init.normal_(p)  # zeros at init would not test the bias path
    return m


@settings(max_examples=12, deadline=None)
@given(
    spatial=st.lists(st.integers(1, 4), min_size=2, max_size=3),
    heads=st.sampled_from([1, 2]),
    rel=st.sampled_from([None, 1, 3]),
    masked=st.booleans(),
    chunk=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 1000),
)
def test_axial_equals_dense_with_axial_mask(spatial, heads, rel, masked, chunk, seed):
    m = _module(4, heads, len(spatial), rel, seed, chunk)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *spatial, 4, dtype=torch.float64, generator=g)
    valid = torch.rand(2, *spatial, generator=g) > 0.3 if masked else None
    out, maps = m(x, valid, need_weights=True)
    ref, ref_maps = _dense_layer(m, x, valid)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    # Per-axis maps: entry [b, h, *p, j] is the dense weight from voxel p to voxel p with its
    # axis coordinate replaced by j. Compare at valid query voxels.
    N = x[0, ..., 0].numel()
    idx = torch.arange(N).view(*spatial)
    for axis, (w, rw) in enumerate(zip(maps.per_axis, ref_maps)):
        L = spatial[axis]
        keys = idx.unsqueeze(-1).movedim(axis, -1).expand(*[s for a, s in enumerate(spatial)
                                                            if a != axis], L, L)
        # keys[..., q, j]: flat index of the voxel at coordinate j on the line of query q.
        keys = keys.movedim(-2, axis)  # (*spatial, L)
        gathered = rw.reshape(2, heads, N, N).gather(
            3, keys.reshape(1, 1, N, L).expand(2, heads, N, L)).view(2, heads, *spatial, L)
        ok = torch.ones(2, *spatial, dtype=torch.bool) if valid is None else valid
        torch.testing.assert_close(w.movedim(1, -2)[ok], gathered.movedim(1, -2)[ok],
                                   atol=1e-10, rtol=1e-10)
    # Off-line weights of the dense reference are exactly zero (same-line mask).
    for axis, rw in enumerate(ref_maps):
        assert bool((rw.masked_select(~axial_mask(tuple(spatial), axis)) == 0).all())


def test_effective_map_is_the_composed_head_averaged_map():
    m = _module(6, 3, 3, 2, seed=1)
    x = torch.randn(1, 3, 4, 2, 6, dtype=torch.float64)
    query = (2, 1, 1)
    _, maps = m(x, need_weights=True, query=query)
    _, ref_maps = _dense_layer(m, x)
    mats = [w.mean(1)[0] for w in ref_maps]  # (N, N) head-averaged per axis
    composed = mats[2] @ mats[1] @ mats[0]
    flat = torch.arange(24).view(3, 4, 2)[query]
    torch.testing.assert_close(maps.effective[0].reshape(-1), composed[flat], atol=1e-12,
                               rtol=1e-12)
    assert maps.query == query
    assert abs(float(maps.effective.detach().sum()) - 1.0) < 1e-12
    assert bool((maps.effective > 0).all())  # three axes reach every voxel


def test_gradcheck_input_and_parameters():
    m = _module(4, 2, 2, 1, seed=2, chunk=2)
    x = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[[True, False], [True, True], [False, False]]])
    assert torch.autograd.gradcheck(lambda t: m(t, valid), (x,))
    # Parameter gradients equal those of the dense reference.
    out = m(x, valid)
    grads = torch.autograd.grad(out.square().sum(), list(m.parameters()))
    ref = _dense_layer(m, x, valid)[0]
    ref_grads = torch.autograd.grad(ref.square().sum(), list(m.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


def test_chunking_does_not_change_the_result_fp32():
    torch.manual_seed(3)
    m = AxialAttention(8, 2, 3, chunk_size=None, rel_pos_max_distance=4)
    x = torch.randn(2, 5, 6, 7, 8)
    valid = torch.rand(2, 5, 6, 7) > 0.2
    a = m(x, valid)
    m.chunk_size = 3
    b = m(x, valid)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_padded_voxels_never_leak_even_nan():
    torch.manual_seed(4)
    m = AxialAttention(4, 2, 2)
    x = torch.randn(1, 4, 5, 4)
    valid = torch.ones(1, 4, 5, dtype=torch.bool)
    valid[0, 3, :] = False  # a padded row
    valid[0, :, 4] = False  # and a padded column: lines with no valid voxel
    dirty = x.clone()
    dirty[~valid] = float("nan")
    out = m(dirty, valid)
    assert bool(torch.isfinite(out).all())
    assert bool((out[~valid] == 0).all())
    # Same as running the unpadded 3x4 image.
    torch.testing.assert_close(out[:, :3, :4], m(x[:, :3, :4]), atol=1e-6, rtol=1e-5)


def test_one_and_four_axes():
    torch.manual_seed(5)
    x = torch.randn(2, 3, 2, 2, 3, 4, dtype=torch.float64)
    m4 = AxialAttention(4, 1, 4).double()
    assert m4(x).shape == x.shape
    m1 = AxialAttention(4, 2, 1).double()
    seq = torch.randn(2, 7, 4, dtype=torch.float64)
    torch.testing.assert_close(m1(seq), _dense_layer(m1, seq)[0])


def test_bad_input_messages():
    m = AxialAttention(8, 2, 3)
    with pytest.raises(ValueError, match=r"\(B, S0, S1, S2, 8\)"):
        m(torch.randn(1, 4, 4, 8))  # a 2D input to a 3D layer
    with pytest.raises(ValueError, match="8 channels"):
        m(torch.randn(1, 4, 4, 4, 3))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(1, 2, 2, 2, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="bool"):
        m(torch.randn(1, 2, 2, 2, 8), torch.ones(1, 2, 2, 2))
    with pytest.raises(ValueError, match="mask must have shape"):
        m(torch.randn(1, 2, 2, 2, 8), torch.ones(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="query"):
        m(torch.randn(1, 2, 2, 2, 8), need_weights=True, query=(0, 0, 5))
    with pytest.raises(ValueError, match="divisible"):
        AxialAttention(10, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        AxialAttention(8, 2, chunk_size=0)


@pytest.mark.parametrize("bias", [True, False])
def test_folded_projections_equal_the_unfolded_axis_chain(bias):
    # forward() folds axis a's output projection into axis a+1's QKV projection; the plain
    # chain of axis_step calls (each with its own output projection) must give the same
    # outputs, maps and gradients, with and without projection biases.
    torch.manual_seed(6)
    m = AxialAttention(6, 3, 3, rel_pos_max_distance=1, bias=bias).double()
    for p in m.rel_pos:
        torch.nn.init.normal_(p)
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(2, 3, 4, 5) > 0.25
    out, maps = m(x, valid, need_weights=True)
    h, ref_maps = x.masked_fill(~valid.unsqueeze(-1), 0.0), []
    for axis in range(3):
        h, w = m.axis_step(h, axis, valid, need_weights=True)
        ref_maps.append(w)
    ref = h.masked_fill(~valid.unsqueeze(-1), 0.0)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for w, rw in zip(maps.per_axis, ref_maps):
        torch.testing.assert_close(w, rw, atol=1e-12, rtol=1e-12)
    params = [x, *m.parameters()]
    grads = torch.autograd.grad(out.square().sum(), params)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-11)
    # Every parameter is reached (out[0] and out[1] only through the folded weights).
    assert all(float(g.abs().sum()) > 0 for g in grads)
    ref_dense = _dense_layer(m, x.detach(), valid)[0]
    torch.testing.assert_close(out.detach(), ref_dense, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="fold_previous"):
        m.projection(0, fold_previous=True)


def test_channels_first_layout_matches_channels_last():
    """channels_first=True takes (B, C, *spatial) (MONAI / lucidrains) and gives the same
    numbers as the channels-last layer, moved; masks and maps keep (B, *spatial)."""
    torch.manual_seed(3)
    last = AxialAttention(8, 2, 3, rel_pos_max_distance=2)
    first = AxialAttention(8, 2, 3, rel_pos_max_distance=2, channels_first=True)
    first.load_state_dict(last.state_dict())
    x = torch.randn(2, 4, 5, 3, 8)
    mask = torch.rand(2, 4, 5, 3) > 0.3
    xf = x.movedim(-1, 1).contiguous().requires_grad_(True)
    out = first(xf, mask)
    assert out.shape == (2, 8, 4, 5, 3)
    torch.testing.assert_close(out, last(x, mask).movedim(-1, 1))
    out.sum().backward()
    assert xf.grad.shape == xf.shape
    o2, maps = first(xf, need_weights=True)
    o1, maps1 = last(x, need_weights=True)
    torch.testing.assert_close(o2, o1.movedim(-1, 1))
    torch.testing.assert_close(maps.effective, maps1.effective)
    with pytest.raises(ValueError, match=r"\(B, 8, S0, S1, S2\) \(channels first"):
        first(torch.randn(2, 8, 4, 5))
    with pytest.raises(ValueError, match="8 channels in its second"):
        first(x)  # a channels-last tensor given to the channels-first layer
    with pytest.raises(ValueError, match="mask must have shape"):
        first(xf, mask.movedim(1, -1))
    with pytest.raises(TypeError, match="channels_first"):
        AxialAttention(8, 2, 3, channels_first="yes")
