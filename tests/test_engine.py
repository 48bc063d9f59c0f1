"""The engine against a plain dense reference: every pattern, composition, weights, gradients."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import TEST_DEVICE, skip_unless_device_available
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit
import attnkit.kernels.structured as structured
from attnkit import SparseWeights, attention, dense_reference
from attnkit import patterns as P

F64 = torch.float64
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _on_test_device():
    """Run this module on ``ATTNKIT_TEST_DEVICE`` (see conftest): with ``cuda`` every tensor a
    test makes without a device lands on the GPU; seeded draws stay on the CPU (then move), so
    both devices see the same numbers."""
    skip_unless_device_available()
    if TEST_DEVICE == "cpu":
        yield
        return
    old = torch.get_default_device()
    torch.set_default_device(TEST_DEVICE)
    try:
        yield
    finally:
        torch.set_default_device(old)


def _qkv(b=2, hq=4, hkv=2, lq=37, lk=37, d=8, dv=5, dtype=F64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g, dtype=dtype, device=CPU).to(TEST_DEVICE)
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=dtype, device=CPU).to(TEST_DEVICE)
    v = torch.randn(b, hkv, lk, dv, generator=g, dtype=dtype, device=CPU).to(TEST_DEVICE)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def _edges(n_src, n_dst, e, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n_src, (e,), generator=g, device=CPU),
                        torch.randint(0, n_dst, (e,), generator=g, device=CPU)])


def patterns_for(lq: int, lk: int) -> dict[str, P.Pattern]:
    n = min(lq, lk)
    pats = {
        "causal": P.causal(),
        "window": P.sliding_window(3),
        "window0": P.sliding_window(0),
        "dilated": P.dilated(2, 3),
        "dilated_wide": P.dilated(120, 2),  # many offsets: masked band
        "exponential": P.exponential(),
        "exponential3": P.exponential(3),
        "global": P.global_tokens([0, n // 2, lk - 1]),
        "random": P.random_keys(3, seed=4),
        "window|global": P.sliding_window(2) | P.global_tokens([1, lk - 2]),
        "window&causal": P.sliding_window(4) & P.causal(),
        "window|exp|global": P.sliding_window(2) | P.exponential() | P.global_tokens([3]),
        "global&causal": P.global_tokens([0, n - 1]) & P.causal(),
        "causal|global": P.causal() | P.global_tokens([n // 3]),
        "dilated&window": P.dilated(3, 2) & P.sliding_window(3),
        "random|window": P.random_keys(2, seed=1) | P.sliding_window(1),
        "exp&causal": P.exponential() & P.causal(),
    }
    if lq == lk:
        pats["graph"] = P.graph(_edges(lk, lq, 3 * lq), lq)
        pats["block_diagonal"] = P.block_diagonal([lq // 3, lq - lq // 3 - 2, 2])
        pats["block_diagonal&causal"] = P.block_diagonal([lq // 2, lq - lq // 2]) & P.causal()
        pats["graph|window"] = P.graph(_edges(lk, lq, lq), lq) | P.sliding_window(1)
    else:
        pats["graph_bipartite"] = P.graph(_edges(lk, lq, 3 * lq), (lk, lq))
    return pats


def _check(q, k, v, pattern, tol=1e-10, **kw):
    lq, lk = q.shape[2], k.shape[2]
    mask = None if pattern is None else pattern.to_dense(lq, lk, q.device)
    ref_kw = {k_: kw[k_] for k_ in ("bias", "scale", "temperature") if k_ in kw}
    ref, w_ref = dense_reference(q, k, v, mask, **ref_kw)
    out, w = attention(q, k, v, pattern=pattern, return_weights=True, **kw)
    out_only = attention(q, k, v, pattern=pattern, **kw)
    wd = w.to_dense() if isinstance(w, SparseWeights) else w
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)
    torch.testing.assert_close(out_only, ref, atol=tol, rtol=0)
    torch.testing.assert_close(wd, w_ref, atol=tol, rtol=0)
    return out, w


@pytest.mark.parametrize("lq,lk", [(37, 37), (20, 45), (130, 130)])
def test_every_pattern_matches_dense_reference(lq, lk):
    q, k, v = _qkv(lq=lq, lk=lk)
    for name, pat in patterns_for(lq, lk).items():
        try:
            _check(q, k, v, pat)
        except AssertionError as e:  # name the failing pattern
            raise AssertionError(f"pattern {name}: {e}") from e


def test_dense_calls_match_reference_including_gqa_and_decoding():
    for hq, hkv in [(4, 4), (4, 2), (4, 1)]:
        q, k, v = _qkv(hq=hq, hkv=hkv, lq=1, lk=50)
        _check(q, k, v, None)
        _check(q, k, v, P.causal())  # a decode step: the last position sees everything
        q, k, v = _qkv(hq=hq, hkv=hkv, lq=12, lk=50)
        _check(q, k, v, P.causal())  # chunked prefill: bottom-right aligned


def test_sparse_weights_are_csr_and_o_nnz():
    q, k, v = _qkv(lq=64, lk=64)
    pat = P.sliding_window(4) | P.global_tokens([10])
    _, w = attention(q, k, v, pattern=pat, return_weights=True)
    assert isinstance(w, SparseWeights)
    nnz = pat.nnz(64, 64)
    assert w.values.shape == (2, 4, nnz) and w.indices.shape == (nnz,)
    indptr, indices = pat.csr(64, 64)
    assert torch.equal(w.indptr, indptr) and torch.equal(w.indices, indices)
    sums = torch.zeros(2, 4, 64, dtype=F64).index_add(2, w.rows, w.values)
    torch.testing.assert_close(sums, torch.ones_like(sums))


# ------------------------------------------------------------------------------- hypothesis

_PRIMS = st.sampled_from(["causal", "window", "dilated", "exp", "global", "random", "none_row"])


def _build(draw, lq, lk, depth=0):
    kind = draw(st.sampled_from(["prim", "prim", "or", "and"] if depth < 2 else ["prim"]))
    if kind == "or":
        return _build(draw, lq, lk, depth + 1) | _build(draw, lq, lk, depth + 1)
    if kind == "and":
        return _build(draw, lq, lk, depth + 1) & _build(draw, lq, lk, depth + 1)
    name = draw(_PRIMS)
    if name == "causal":
        return P.causal()
    if name == "window":
        return P.sliding_window(draw(st.integers(0, 9)))
    if name == "dilated":
        return P.dilated(draw(st.integers(0, 5)), draw(st.integers(1, 4)))
    if name == "exp":
        return P.exponential(draw(st.integers(2, 4)))
    if name == "global":
        return P.global_tokens(draw(st.lists(st.integers(0, lk - 1), min_size=0, max_size=4)))
    if name == "random":
        return P.random_keys(draw(st.integers(1, 4)), seed=draw(st.integers(0, 3)))
    # a graph with some isolated targets (empty rows)
    e = draw(st.integers(0, 2 * lq))
    src = draw(st.lists(st.integers(0, lk - 1), min_size=e, max_size=e))
    dst = draw(st.lists(st.integers(0, lq - 1), min_size=e, max_size=e))
    return P.graph(torch.tensor([src, dst], dtype=torch.long).view(2, e), (lk, lq))


@st.composite
def problems(draw):
    lq = draw(st.integers(1, 70))
    lk = draw(st.integers(1, 70))
    hkv = draw(st.sampled_from([1, 2]))
    g = draw(st.sampled_from([1, 3]))
    b = draw(st.integers(1, 2))
    d = draw(st.sampled_from([1, 4, 7]))
    pat = _build(draw, lq, lk)
    block = draw(st.sampled_from([4, 16, 64]))
    return lq, lk, hkv, g, b, d, pat, block


@settings(max_examples=60, deadline=None)
@given(problems())
def test_random_patterns_and_shapes_match_reference(problem):
    lq, lk, hkv, g, b, d, pat, block = problem
    old = structured.BLOCK
    structured.BLOCK = block
    try:
        q, k, v = _qkv(b=b, hq=hkv * g, hkv=hkv, lq=lq, lk=lk, d=d, dv=3)
        out, _ = _check(q, k, v, pat)
        assert torch.isfinite(out).all()
    finally:
        structured.BLOCK = old


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_nnz_from_offsets_counts_what_enumeration_counts(data):
    """The formula count (each allowed offset o in L - |o| rows) equals the pairs listed chunk
    by chunk, for every composed pattern it claims; None where rows differ (global tokens,
    index-based parts) or Lq != Lk."""
    from attnkit.kernels.enumerate import count_pairs

    lq = data.draw(st.integers(1, 70))
    lk = data.draw(st.sampled_from([lq, lq + 3]))
    pat = _build(data.draw, lq, lk)
    counted = pat.nnz_from_offsets(lq, lk)
    listed = count_pairs(pat.plan(lq, lk), lq, lk)
    if lq != lk or pat.split_global() is None or pat.global_indices():
        assert counted is None
    else:
        assert counted == listed
    assert pat.nnz(lq, lk) == listed == int(pat.to_dense(lq, lk).sum())


# ------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", ["window", "dilated", "exponential", "global", "random",
                                  "window|exp|global", "window&causal", "graph",
                                  "block_diagonal", "causal|global"])
def test_gradcheck_every_pattern(name):
    q, k, v = _qkv(b=1, hq=2, hkv=1, lq=11, lk=11, d=3, dv=2, requires_grad=True)
    pat = patterns_for(11, 11)[name]
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, pattern=pat), (q, k, v),
                                    fast_mode=True)


@pytest.mark.parametrize("d", [3, 8])  # 3: gathered scores, 8: sampled products (SDDMM)
@pytest.mark.parametrize("sparse_mm", [True, False])  # CSR kernels or the gather fallback
def test_edge_kernels_gradcheck_with_groups_batches_and_empty_rows(d, sparse_mm, monkeypatch):
    import attnkit.kernels.csr as csr

    if not sparse_mm:
        monkeypatch.setattr(csr, "supports", lambda t: False)
    lq = lk = 10
    ei = _edges(lk, lq, 25)
    ei = ei[:, ei[1] != 7]  # node 7 receives nothing: an empty row
    pat = P.graph(ei, lq)
    q, k, v = _qkv(b=2, hq=4, hkv=2, lq=lq, lk=lk, d=d, dv=3, requires_grad=True)
    out = attention(q, k, v, pattern=pat)
    ref, _ = dense_reference(q, k, v, pat.to_dense(lq, lk))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    assert (out[:, :, 7] == 0).all()
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, pattern=pat), (q, k, v),
                                    fast_mode=True)


def test_gradcheck_bias_temperature_and_weights():
    q, k, v = _qkv(b=1, hq=2, hkv=2, lq=9, lk=9, d=3, dv=2, requires_grad=True)
    bias = torch.randn(1, 2, 9, 9, dtype=F64, requires_grad=True)
    temp = torch.tensor([0.7, 1.9], dtype=F64, requires_grad=True)
    pat = P.sliding_window(2) | P.global_tokens([4])

    def f(q, k, v, bias, temp):
        out, w = attention(q, k, v, pattern=pat, bias=bias, temperature=temp,
                           return_weights=True)
        return out, w.values

    assert torch.autograd.gradcheck(f, (q, k, v, bias, temp), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, t: attention(q, k, v, temperature=t, return_weights=True),
        (q, k, v, temp), fast_mode=True)


def test_gradients_match_reference_through_chunks_and_checkpointing(monkeypatch):
    # Tiny chunks force many chunks, so backward recomputes them (checkpointing).
    monkeypatch.setattr(structured, "CHUNK_ELEMENTS", 2000)
    monkeypatch.setattr(structured, "BLOCK", 8)
    lq = 60
    for pat in [P.sliding_window(5) | P.global_tokens([0, 50]) | P.exponential(),
                P.graph(_edges(lq, lq, 200), lq), P.dilated(3, 4) & P.causal()]:
        q, k, v = _qkv(b=1, hq=2, hkv=1, lq=lq, lk=lq, requires_grad=True)
        out = attention(q, k, v, pattern=pat)
        go = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), go)
        q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
        ref, _ = dense_reference(q2, k2, v2, pat.to_dense(lq, lq))
        ref_grads = torch.autograd.grad(ref, (q2, k2, v2), go)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------- empty rows, extremes


def test_empty_rows_give_zeros_and_finite_gradients():
    lq = 16
    ei = torch.tensor([[0, 1, 2], [3, 3, 5]])  # most targets have no edge
    cases = [
        (P.graph(ei, lq), None),
        (P.causal(), None),  # with Lq > Lk below, leading rows are empty
        (None, torch.zeros(1, 1, lq, lq).masked_fill(torch.arange(lq).view(-1, 1) < 4,
                                                     float("-inf"))),
        (P.sliding_window(2), torch.zeros(1, 1, lq, lq).masked_fill(
            torch.arange(lq).view(-1, 1) < 4, float("-inf")).to(F64)),
    ]
    for pat, bias in cases:
        lk = 10 if isinstance(pat, P.Causal) else lq
        q, k, v = _qkv(b=1, hq=2, hkv=1, lq=lq, lk=lk, requires_grad=True)
        for weights in (False, True):
            res = attention(q, k, v, pattern=pat, bias=bias, return_weights=weights)
            out = res[0] if weights else res
            mask = torch.ones(lq, lk, dtype=torch.bool) if pat is None else pat.to_dense(lq, lk)
            ref, _ = dense_reference(q, k, v, mask, bias=bias)
            torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
            empty = ~mask.any(1) if bias is None else torch.arange(lq) < 4
            assert empty.any()
            assert (out[:, :, empty] == 0).all()
            grads = torch.autograd.grad(out.sum(), (q, k, v))
            assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("pat", [None, P.causal(), P.sliding_window(3),
                                 P.sliding_window(2) | P.global_tokens([5]), P.exponential()])
def test_extreme_logits_are_stable(pat):
    q, k, v = _qkv(lq=20, lk=20, requires_grad=True)
    qs = q * 1e4 / math.sqrt(8)  # logits of size ~1e4
    out = attention(qs, k, v, pattern=pat)
    mask = None if pat is None else pat.to_dense(20, 20)
    ref, _ = dense_reference(qs, k, v, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-8, rtol=0)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), (q, k, v)))
    out32 = attention(qs.float(), k.float(), v.float(), pattern=pat)
    assert torch.isfinite(out32).all()


# ------------------------------------------------------------------------ score_mod, options


def test_score_mod_equals_bias_for_every_kind_of_pattern():
    lq = 40
    slopes = torch.tensor([0.5, 0.25, 0.1, 0.05], dtype=F64, requires_grad=True)

    def alibi(score, b, h, qi, kj):
        return score - slopes[h] * (qi - kj).abs()

    dist = (torch.arange(lq).view(-1, 1) - torch.arange(lq).view(1, -1)).abs()
    for pat in [None, P.causal(), P.sliding_window(3), P.exponential(),
                P.sliding_window(2) | P.global_tokens([7]), P.graph(_edges(lq, lq, 120), lq),
                P.block_diagonal([15, 25])]:
        q, k, v = _qkv(lq=lq, lk=lq)
        bias = -(slopes.view(1, -1, 1, 1) * dist)
        out, w = attention(q, k, v, pattern=pat, score_mod=alibi, return_weights=True)
        mask = None if pat is None else pat.to_dense(lq, lq)
        ref, w_ref = dense_reference(q, k, v, mask, bias=bias)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
        wd = w.to_dense() if isinstance(w, SparseWeights) else w
        torch.testing.assert_close(wd, w_ref, atol=1e-10, rtol=0)
        g1 = torch.autograd.grad(out.sum(), slopes)[0]
        g2 = torch.autograd.grad(ref.sum(), slopes)[0]
        torch.testing.assert_close(g1, g2, atol=1e-10, rtol=0)


def test_gradcheck_score_mod_parameters():
    table = torch.randn(7, dtype=F64, requires_grad=True)
    q, k, v = _qkv(b=1, hq=2, hkv=1, lq=10, lk=10, d=3, dv=2, requires_grad=True)

    def f(q, k, v, table):
        mod = lambda s, b, h, qi, kj: s + table[(qi - kj).clamp(-3, 3) + 3]  # noqa: E731
        return attention(q, k, v, pattern=P.sliding_window(2) | P.global_tokens([0]),
                         score_mod=mod)

    assert torch.autograd.gradcheck(f, (q, k, v, table), fast_mode=True)


def test_temperature_and_scale():
    q, k, v = _qkv()
    pat = P.sliding_window(3)
    _check(q, k, v, pat, temperature=2.5)
    _check(q, k, v, pat, scale=0.3)
    _check(q, k, v, None, temperature=torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=F64))
    _check(q, k, v, pat, temperature=torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=F64))
    # A higher temperature flattens attention: weights have higher entropy.
    _, w1 = attention(q, k, v, pattern=pat, return_weights=True)
    _, w2 = attention(q, k, v, pattern=pat, return_weights=True, temperature=5.0)

    def ent(w):
        return -(w.values * w.values.clamp_min(1e-300).log()).sum()

    assert ent(w2) > ent(w1)


def test_dense_bias_and_bool_mask():
    q, k, v = _qkv(lq=12, lk=15)
    bias = torch.randn(2, 1, 12, 15, dtype=F64)
    _check(q, k, v, None, bias=bias)
    _check(q, k, v, P.sliding_window(3), bias=bias)
    keep = torch.rand(12, 15) > 0.3
    out = attention(q, k, v, bias=keep)
    ref, _ = dense_reference(q, k, v, keep)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_dropout():
    q, k, v = _qkv(lq=30, lk=30, dtype=torch.float32)
    pat = P.sliding_window(4) | P.global_tokens([3])
    torch.manual_seed(0)
    a = attention(q, k, v, pattern=pat, dropout_p=0.5)
    torch.manual_seed(0)
    b = attention(q, k, v, pattern=pat, dropout_p=0.5)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, attention(q, k, v, pattern=pat), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype):
    q, k, v = _qkv(lq=50, lk=50, dtype=torch.float32)
    for pat in [None, P.sliding_window(5) | P.global_tokens([1]), P.exponential()]:
        ref = attention(q.double(), k.double(), v.double(), pattern=pat).float()
        out = attention(q.to(dtype), k.to(dtype), v.to(dtype), pattern=pat)
        assert out.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_fp32_matches_reference_to_1e5():
    q, k, v = _qkv(lq=160, lk=160, dtype=torch.float32, d=32)
    for name, pat in patterns_for(160, 160).items():
        ref, _ = dense_reference(q.double(), k.double(), v.double(), pat.to_dense(160, 160))
        out = attention(q, k, v, pattern=pat)
        assert (out.double() - ref).abs().max() < 1e-5, name


# ------------------------------------------------------------------------- no N x N tensors


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                # a sparse tensor holds its stored values, not numel() (its dense size)
                n = t._nnz() if t.layout != torch.strided else t.numel()
                self.largest = max(self.largest, n)
        return out


@pytest.mark.parametrize("pat", [P.sliding_window(16), P.dilated(8, 4), P.exponential(),
                                 P.sliding_window(16) | P.global_tokens([0, 999, 2000]),
                                 P.sliding_window(16) & P.causal(), P.random_keys(8)])
def test_sparse_patterns_never_build_an_lq_by_lk_tensor(pat):
    L = 4096
    q, k, v = _qkv(b=1, hq=1, hkv=1, lq=L, lk=L, d=8, dv=8, dtype=torch.float32,
                   requires_grad=True)
    with _LargestTensor() as mode:
        out, w = attention(q, k, v, pattern=pat, return_weights=True)
        (out.sum() + w.values.sum()).backward()
    assert mode.largest < L * L / 8, f"{pat}: a tensor of {mode.largest} elements"


# ------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q must have shape"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="Hq=4 must be a multiple of k/v heads Hkv=3"):
        attention(q, torch.randn(2, 3, 37, 8, dtype=F64), torch.randn(2, 3, 37, 5, dtype=F64))
    with pytest.raises(ValueError, match="k and v must have the same heads"):
        attention(q, k, v[:, :1])
    with pytest.raises(ValueError, match="head dim"):
        attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="batch sizes differ"):
        attention(q[:1], k, v)
    with pytest.raises(TypeError, match="one dtype"):
        attention(q.float(), k, v)
    with pytest.raises(ValueError, match="bias of shape"):
        attention(q, k, v, bias=torch.zeros(3, 37))
    with pytest.raises(ValueError, match="temperature"):
        attention(q, k, v, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        attention(q, k, v, temperature=torch.ones(3))
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, dropout_p=1.5)
    with pytest.raises(TypeError, match="pattern must be"):
        attention(q, k, v, pattern="window")
    with pytest.raises(ValueError, match="window w must be"):
        P.sliding_window(-1)
    with pytest.raises(TypeError, match="window w must be an int"):
        P.sliding_window(2.5)
    with pytest.raises(ValueError, match="dilated d"):
        P.dilated(2, 0)
    with pytest.raises(ValueError, match="base"):
        P.exponential(1)
    with pytest.raises(ValueError, match="edge_index out of range"):
        P.graph(torch.tensor([[0, 40], [1, 2]]), 37)
    with pytest.raises(ValueError, match="negative"):
        P.graph(torch.tensor([[0, -1], [1, 2]]), 37)
    with pytest.raises(ValueError, match=r"edge_index must have shape \(2, E\)"):
        P.graph(torch.zeros(3, 4, dtype=torch.long), 37)
    with pytest.raises(ValueError, match="graph pattern has"):
        attention(q, k, v, pattern=P.graph(torch.tensor([[0], [1]]), 10))
    with pytest.raises(ValueError, match="global_tokens indices must be < sequence length"):
        attention(q, k, v, pattern=P.global_tokens([100]))
    with pytest.raises(ValueError, match="block_diagonal lengths sum"):
        attention(q, k, v, pattern=P.block_diagonal([10, 10]))
    with pytest.raises(ValueError, match="block_diagonal lengths must be positive"):
        P.block_diagonal([3, 0])
    bad = q.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="q contains NaN"):
        attention(bad, k, v, check_finite=True)
    with pytest.raises(TypeError, match="score_mod"):
        attention(q, k, v, score_mod=3)
    with pytest.raises(TypeError, match="floating-point"):
        attention(q.long(), k.long(), v.long())


def test_pattern_algebra_and_inspection():
    lq, lk = 50, 50
    a, b = P.sliding_window(3), P.global_tokens([5, 30])
    c = P.exponential()
    for pat, dense in [(a | b, a.to_dense(lq, lk) | b.to_dense(lq, lk)),
                       (a & c, a.to_dense(lq, lk) & c.to_dense(lq, lk)),
                       ((a | b) & P.causal(), (a.to_dense(lq, lk) | b.to_dense(lq, lk))
                        & P.causal().to_dense(lq, lk))]:
        assert torch.equal(pat.to_dense(lq, lk), dense)
        assert pat.nnz(lq, lk) == int(dense.sum())
        indptr, indices = pat.csr(lq, lk)
        rebuilt = torch.zeros(lq, lk, dtype=torch.bool)
        rows = torch.repeat_interleave(torch.arange(lq), indptr[1:] - indptr[:-1])
        rebuilt[rows, indices] = True
        assert torch.equal(rebuilt, dense)
    # exponential: j = i, i +- 1, i +- 2, i +- 4, ...
    row = P.exponential().to_dense(40, 40)[20].nonzero().flatten().tolist()
    assert row == [4, 12, 16, 18, 19, 20, 21, 22, 24, 28, 36]
    assert P.dilated(2, 3).to_dense(20, 20)[10].nonzero().flatten().tolist() == [4, 7, 10, 13, 16]
    assert repr(a | b).startswith("(sliding_window(3) | global_tokens")


def test_public_api_names():
    assert attnkit.attention is attention
    for name in ["causal", "sliding_window", "dilated", "exponential", "global_tokens",
                 "random_keys", "graph", "block_diagonal"]:
        assert callable(getattr(P, name))


@pytest.mark.parametrize("shape", [(7,), ()])
def test_low_rank_bias_broadcasts_like_the_reference(shape):
    """A bias of shape (Lk,) or a scalar broadcasts to (B, Hq, Lq, Lk) (SDPA needs 2-D masks)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64, device=CPU)
    k, v = (torch.randn(2, 2, 7, 4, generator=g, dtype=torch.float64, device=CPU)
            for _ in range(2))
    bias = torch.randn(shape, generator=g, dtype=torch.float64, device=CPU)
    ref = dense_reference(q, k, v, bias=bias.expand(2, 2, 5, 7))[0]
    torch.testing.assert_close(attention(q, k, v, bias=bias), ref)


# ------------------------------------------------------------------- what patterns tell others


def test_patterns_tell_their_offsets_globals_and_halo():
    n = 64
    win_glob = P.sliding_window(3) | P.global_tokens([5, 40])
    local, hubs = win_glob.split_global()
    assert hubs == (5, 40) and win_glob.global_indices() == (5, 40)
    assert torch.equal(local.offsets_within(n), torch.arange(-3, 4))
    assert win_glob.halo(n) == (3, 3)
    assert (P.sliding_window(4) & P.causal()).halo(n) == (4, 0)
    assert P.dilated(3, 2).halo(n) == (6, 6)
    assert torch.equal(P.dilated(3, 2).offsets_within(n), torch.arange(-6, 7, 2))
    exp = P.exponential()
    assert exp.halo(n) == (32, 32) and exp.offsets_within(n).tolist()[:3] == [-32, -16, -8]
    # the offsets are a superset of the allowed pairs' offsets, checked on the dense mask
    for pat in (P.sliding_window(2) | P.exponential(), P.dilated(5, 3) & P.sliding_window(7),
                P.causal() & P.exponential(3)):
        rows, cols = pat.pairs(n, n)
        offs = pat.offsets_within(n)
        assert torch.isin(cols - rows, offs).all(), pat
        left, right = pat.halo(n)
        assert int((cols - rows).min()) == -left and int((cols - rows).max()) == right
    for index_based in (P.random_keys(2), P.block_diagonal([32, 32]),
                        P.graph(_edges(n, n, 30), n) | P.sliding_window(1)):
        assert index_based.split_global() is None and index_based.offsets_within(n) is None
        with pytest.raises(ValueError, match="not made of offsets"):
            index_based.halo(n)
    assert (P.global_tokens([1]) & P.causal()).split_global() == (None, (1,))


def test_one_input_check_for_attention_and_the_sequence_parallel_entry():
    from attnkit.distributed.sequence import _local_error
    from attnkit.functional import check_qkv

    q, k, v = _qkv()
    check_qkv(q, k, v)  # fine
    k3, v3 = torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1)  # 3 k/v heads
    with pytest.raises(ValueError, match="q heads Hq=4 must be a multiple"):
        check_qkv(q, k3, v3)
    with pytest.raises(ValueError, match=r"q must have shape \(B, H, L_local, D\)"):
        check_qkv(q[None], k[None], v[None], sharded=True)
    with pytest.raises(ValueError, match="same positions"):
        check_qkv(q, k[:, :, :5], v[:, :, :5], sharded=True)
    assert "scale must be finite" in _local_error(q, k, v, float("nan"))
    assert "multiple of k/v heads" in _local_error(q, k3, v3, None)
    assert _local_error(q, k, v, None) == ""


def test_weights_in_csr_order_across_chunks_for_every_pattern(monkeypatch):
    """Weights come from each component's own score step, merged into CSR order chunk by
    chunk: with tiny chunks they must still equal the dense reference, in pat.csr order."""
    monkeypatch.setattr(structured, "CHUNK_ELEMENTS", 3000)
    q, k, v = _qkv(b=1, hq=2, hkv=1, lq=130, lk=130, dv=4)
    for name, pat in patterns_for(130, 130).items():
        if pat.is_dense:
            continue
        _, w = _check(q, k, v, pat)
        indptr, indices = pat.csr(130, 130, q.device)
        assert torch.equal(w.indptr, indptr) and torch.equal(w.indices, indices), name


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("lq, lk", [(130, 130), (70, 90)])
def test_weights_indices_are_int32_where_they_fit_else_int64(dtype, lq, lk, monkeypatch):
    """SparseWeights' indptr and indices are int32 while every slot and key fits (as scipy
    chooses), int64 past that; with int64 forced on every writer (the compiled band kernel
    alone and in a union, masked bands, offset and edge lists, the general path, an empty
    batch) the weights are the same, and both export."""
    import attnkit.functional as functional_
    import attnkit.kernels.enumerate as enumerate_

    assert structured.index_dtype(2**31 - 1, 2**31 - 1) == torch.int32
    assert structured.index_dtype(2**31, 10) == torch.int64
    assert structured.index_dtype(10, 2**31) == torch.int64
    q, k, v = _qkv(b=2, hq=4, hkv=2, lq=lq, lk=lk, dtype=dtype)
    pats = {n: p for n, p in patterns_for(lq, lk).items() if not p.is_dense}

    def weights():
        with torch.no_grad():
            got = {n: attention(q, k, v, pattern=p, return_weights=True)[1]
                   for n, p in pats.items()}
            got["empty batch"] = attention(q[:0], k[:0], v[:0], pattern=pats["window"],
                                           return_weights=True)[1]
        return got

    narrow = weights()
    for name, w in narrow.items():
        assert w.indptr.dtype == w.indices.dtype == torch.int32, name
    monkeypatch.setattr(enumerate_, "index_dtype", lambda *a: torch.int64)
    monkeypatch.setattr(functional_, "index_dtype", lambda *a: torch.int64)
    for name, w in weights().items():
        w32 = narrow[name]
        assert w.indptr.dtype == w.indices.dtype == torch.int64, name
        assert torch.equal(w.indptr, w32.indptr) and torch.equal(w.indices, w32.indices), name
        assert torch.equal(w.values, w32.values), name
        if name != "empty batch":
            for x in (w, w32):
                assert torch.equal(x.to_torch_sparse().to_dense(), x.to_dense()), name
    pytest.importorskip("scipy")
    w = narrow["window|global"]
    assert (w.to_scipy(1, 3).toarray() == w.to_dense()[1, 3].cpu().numpy()).all()


def _weights_match_reference(q, k, v, pat, out, w, bias=None):
    """``out`` and the sparse weights ``w`` of ``attention(q, k, v, pattern=pat, bias=bias,
    return_weights=True)`` against the fp64 dense reference and the pattern's CSR layout.
    Returns the tolerance used (by dtype) and the pattern's indices."""
    lq, lk = q.shape[2], k.shape[2]
    ref_out, ref_w = dense_reference(q.double(), k.double(), v.double(), pat.to_dense(lq, lk),
                                     bias=None if bias is None else bias.double())
    tol = 1e-10 if q.dtype == F64 else 2e-6
    torch.testing.assert_close(w.to_dense().double(), ref_w, atol=tol, rtol=0)
    torch.testing.assert_close(out.double(), ref_out, atol=10 * tol, rtol=0)
    indptr, indices = pat.csr(lq, lk)
    assert torch.equal(w.indptr, indptr) and torch.equal(w.indices, indices)
    assert w.values.shape == (*q.shape[:2], indices.numel())
    return tol, indices


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("lq,lk,chunk", [(150, 150, None), (260, 130, None), (300, 300, 3000)])
def test_masked_band_weights_come_from_the_forward(dtype, lq, lk, chunk, monkeypatch):
    """A masked band (a dilated pattern with many offsets) appends its probabilities to the
    CSR buffers as its forward computes them, chunk by chunk (GQA, batch 2, empty rows when
    Lq > Lk): no second scoring pass, and equal to the dense reference and to that pass."""
    import attnkit.kernels.enumerate as enumerate_
    from attnkit.kernels import structured

    if chunk is not None:
        monkeypatch.setattr(structured, "CHUNK_ELEMENTS", chunk)
    pat = P.dilated(64, 2)
    plan = structured.lower(pat.plan(lq, lk), lq, lk)
    assert len(plan) == 1 and plan[0].band is not None and plan[0].masks  # a masked band
    q, k, v = _qkv(b=2, hq=4, hkv=2, lq=lq, lk=lk, dtype=dtype)
    calls, sizes = [], []
    real = enumerate_.component_scores
    monkeypatch.setattr(enumerate_, "component_scores",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    real_sink = enumerate_.weights_sink

    def sink_spy(*a):
        sink = real_sink(*a)
        sizes.append(sink.values.shape[1])
        return sink

    monkeypatch.setattr("attnkit.functional.weights_sink", sink_spy)
    with torch.no_grad():
        out, w = attention(q, k, v, pattern=pat, return_weights=True)
    assert not calls  # written by the forward
    tol, indices = _weights_match_reference(q, k, v, pat, out, w)
    if lq == lk:  # nnz known up front (pat.nnz_from_offsets): buffers of exactly nnz pairs
        assert sizes == [indices.numel()]
    monkeypatch.setattr(enumerate_, "weights_sink", lambda *a: None)
    monkeypatch.setattr("attnkit.functional.weights_sink", lambda *a: None)
    with torch.no_grad():
        _, slow = attention(q, k, v, pattern=pat, return_weights=True)
    assert calls  # the second pass really ran
    assert torch.equal(slow.indices, w.indices)
    torch.testing.assert_close(w.values, slow.values, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind,lq,lk,chunk", [("random", 150, 150, None),
                                             ("graph", 300, 300, 3000),
                                             ("bipartite", 90, 200, 2000),
                                             ("exponential", 300, 300, 3000),
                                             ("dilated", 120, 170, 2000),
                                             ("exp&causal", 200, 200, 3000)])
def test_edge_and_offset_lists_write_their_weights_in_the_forward(dtype, kind, lq, lk, chunk,
                                                                   monkeypatch):
    """A plan of one edge list (random keys, a graph) writes each chunk's probabilities at
    their CSR slots, one of offsets (exponential, dilated, masked or not) appends them, as the
    kernel computes them (GQA, batch 2, a bias, rows without mass, several chunks): no second
    scoring pass, equal to the dense reference and to that pass; a score_mod whose parameter
    needs a gradient leaves them to the second pass."""
    import attnkit.kernels.enumerate as enumerate_
    from attnkit.kernels import structured

    if chunk is not None:
        monkeypatch.setattr(structured, "CHUNK_ELEMENTS", chunk)
    pat = {"random": lambda: P.random_keys(5, seed=3),
           "graph": lambda: P.graph(_edges(lk, lq, 2 * lq), lq),
           "bipartite": lambda: P.graph(_edges(lk, lq, 2 * lq), (lk, lq)),
           "exponential": lambda: P.exponential(),
           "dilated": lambda: P.dilated(6, 3),
           "exp&causal": lambda: P.exponential() & P.causal()}[kind]()
    plan = structured.lower(pat.plan(lq, lk), lq, lk)
    kernel = structured.Edges if kind in ("random", "graph", "bipartite") else structured.Offsets
    assert len(plan) == 1 and isinstance(plan[0], kernel)
    q, k, v = _qkv(b=2, hq=4, hkv=2, lq=lq, lk=lk, dtype=dtype)
    bias = torch.randn(4, lq, lk, generator=torch.Generator().manual_seed(2), dtype=dtype)
    bias[1, 3] = float("-inf")  # a row with no mass: weights 0
    calls = []
    real = enumerate_.component_scores
    monkeypatch.setattr(enumerate_, "component_scores",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        out, w = attention(q, k, v, pattern=pat, bias=bias, return_weights=True)
    assert not calls  # written by the forward
    tol, _ = _weights_match_reference(q, k, v, pat, out, w, bias)
    # a differentiable score_mod: the forward keeps its probabilities, the second pass runs
    scale = torch.tensor(1.0, dtype=dtype, requires_grad=True)
    _, w_mod = attention(q, k, v, pattern=pat, bias=bias, return_weights=True,
                         score_mod=lambda s, b, h, i, j: s * scale)
    assert calls
    torch.testing.assert_close(w_mod.to_dense().detach().double(), w.to_dense().double(),
                               atol=tol, rtol=0)
    calls.clear()
    monkeypatch.setattr("attnkit.functional.weights_sink", lambda *a: None)
    with torch.no_grad():
        _, slow = attention(q, k, v, pattern=pat, bias=bias, return_weights=True)
    assert calls  # the second pass really ran
    assert torch.equal(slow.indices, w.indices)
    torch.testing.assert_close(w.values, slow.values, atol=tol, rtol=0)


def test_appended_weights_with_a_wrong_up_front_count(monkeypatch):
    """An appending sink sized by a count that is too small raises instead of returning
    weights cut short; one that is too large still gives exact weights (the unused tail cut)."""
    pat = P.dilated(64, 2)  # a masked band: appended, buffers sized by nnz_from_offsets
    q, k, v = _qkv(b=1, hq=2, hkv=1, lq=150, lk=150)
    nnz = pat.nnz(150, 150)
    monkeypatch.setattr(type(pat), "nnz_from_offsets", lambda self, lq, lk: nnz + 7)
    with torch.no_grad():
        out, w = attention(q, k, v, pattern=pat, return_weights=True)
    _weights_match_reference(q, k, v, pat, out, w)
    monkeypatch.setattr(type(pat), "nnz_from_offsets", lambda self, lq, lk: nnz - 7)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="more pairs"):
        warnings.simplefilter("ignore")  # torch warns as it resizes the short output
        with torch.no_grad():
            attention(q, k, v, pattern=pat, return_weights=True)
