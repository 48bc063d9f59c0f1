"""The fused compiled band kernel (attnkit.kernels.native) against dense fp64 references.

It serves fp32 CPU bands without extra masks or dropout; every other call takes the PyTorch
kernels (tested in test_engine.py). Here each test checks the native path was really taken.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import sys
import types

import pytest
import torch
from conftest import passed_with_isa_flags, thread_team
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit.kernels.structured as structured
from attnkit import attention, dense_reference
from attnkit import patterns as P
from attnkit.kernels import native

HAS_CC = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
pytestmark = [
    pytest.mark.skipif(not HAS_CC, reason="no C compiler: the native kernels are optional"),
    pytest.mark.skipif(native._native_disabled(), reason="ATTNKIT_NATIVE=0: kernels turned off"),
]


@pytest.fixture()
def calls(monkeypatch):
    """Count calls of the fused kernel (and fail loudly if it is unavailable)."""
    assert native.band_available(), "a C compiler exists, so the fused kernel must build"
    seen = []
    real = native.band_forward

    def spy(*a, **kw):
        seen.append(a[3:])
        return real(*a, **kw)

    monkeypatch.setattr(native, "band_forward", spy)
    return seen


def _qkv(b, hq, hkv, lq, lk, d, dv, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g) * scale
    k = torch.randn(b, hkv, lk, d, generator=g) * scale
    v = torch.randn(b, hkv, lk, dv, generator=g)
    return q, k, v


def _ref(q, k, v, pattern):
    mask = pattern.to_dense(q.shape[2], k.shape[2])
    return dense_reference(q.double(), k.double(), v.double(), mask)[0]


CASES = {
    "window": (P.sliding_window(5), 1, 4, 2, 37, 37, 8, 5),
    "window & causal": (P.sliding_window(6) & P.causal(), 2, 2, 2, 41, 41, 16, 16),
    "causal window, GQA 4:1": (P.sliding_window(9) & P.causal(), 1, 4, 1, 70, 70, 8, 3),
    "wide window, one block": (P.sliding_window(200), 1, 2, 2, 150, 150, 8, 8),
    "fewer queries than keys (decoding alignment)": (P.sliding_window(3), 1, 2, 2, 9, 30, 8, 8),
    "more queries than keys: empty rows": (P.sliding_window(2) & P.causal(), 1, 2, 2, 30, 9, 8,
                                           8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_band_matches_dense_reference(name, calls):
    pattern, b, hq, hkv, lq, lk, d, dv = CASES[name]
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dv)
    out = attention(q, k, v, pattern=pattern)
    assert calls, "the fused kernel was not used"
    assert (out.double() - _ref(q, k, v, pattern)).abs().max() < 1e-5
    assert torch.isfinite(out).all()


def test_empty_rows_give_zeros(calls):
    q, k, v = _qkv(1, 2, 2, 30, 9, 8, 8)
    out = attention(q, k, v, pattern=P.sliding_window(2) & P.causal())
    mask = (P.sliding_window(2) & P.causal()).to_dense(30, 9)
    empty = ~mask.any(1)
    assert calls and empty.any()
    assert (out[:, :, empty] == 0).all()


def test_extreme_logits_are_stable(calls):
    q, k, v = _qkv(1, 2, 2, 64, 64, 16, 8, scale=60.0)  # logits of size ~1e4
    out = attention(q, k, v, pattern=P.sliding_window(7))
    assert calls and torch.isfinite(out).all()
    assert (out.double() - _ref(q, k, v, P.sliding_window(7))).abs().max() < 1e-4


@pytest.mark.parametrize("union", [False, True])
def test_gradients_with_tiny_chunks_match_fp64(union, calls, monkeypatch):
    # tiny engine chunks: with autograd the band still runs over all rows in one call (its
    # chunks' slices would cost a full-size zero gradient each in backward); in a union the
    # other components are chunked (and checkpointed) on their own, merged through the lse
    monkeypatch.setattr(structured, "CHUNK_ELEMENTS", 2000)
    pattern = P.sliding_window(4)
    if union:
        pattern = pattern | P.global_tokens([0, 37, 99]) | P.exponential()
    q, k, v = _qkv(2, 4, 2, 100, 100, 8, 6, seed=3)
    w = torch.randn(2, 4, 100, 6, generator=torch.Generator().manual_seed(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    (attention(*leaves, pattern=pattern) * w).sum().backward()
    assert calls == [(-4, 4, 0, 100)]
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    mask = pattern.to_dense(100, 100)
    (dense_reference(*ref, mask)[0] * w.double()).sum().backward()
    for got, want in zip(leaves, ref):
        assert (got.grad.double() - want.grad).abs().max() < 1e-5


def test_chunked_rows_without_autograd_fill_one_output(calls, monkeypatch):
    """Without autograd, the chunks write into one preallocated output (and read the keys and
    values of their band as slices in place): same result as the dense reference."""
    monkeypatch.setattr(structured, "CHUNK_ELEMENTS", 2000)
    pattern = P.sliding_window(4) | P.global_tokens([7, 60])
    q, k, v = _qkv(2, 4, 2, 100, 100, 8, 6, seed=6)
    with torch.no_grad():
        out = attention(q, k, v, pattern=pattern)
    assert len(calls) >= 4  # several chunks
    ref = dense_reference(q.double(), k.double(), v.double(), pattern.to_dense(100, 100))[0]
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("chunk", [None, 2000])
def test_one_band_without_autograd_scales_the_queries_in_the_kernel(chunk, monkeypatch):
    """A plan of one band without autograd, weights, bias or score_mod hands the compiled
    kernel the unscaled queries and their factor (scale / temperature): no scaled copy, the
    same result as scaling first (bitwise on the lane path, which takes the same fp32
    product), across chunks too; with autograd, a per-head temperature or weights the queries
    are scaled first, as before."""
    if chunk is not None:
        monkeypatch.setattr(structured, "CHUNK_ELEMENTS", chunk)
    seen = []
    real = native.band_forward

    def spy(qs, *a, **kw):
        seen.append((qs.data_ptr(), kw.get("scale", 1.0)))
        return real(qs, *a, **kw)

    monkeypatch.setattr(native, "band_forward", spy)
    q, k, v = _qkv(2, 4, 2, 100, 100, 16, 6, seed=8)
    pat = P.sliding_window(9) & P.causal()
    with torch.no_grad():
        out = attention(q, k, v, pattern=pat, scale=0.3, temperature=1.5)
    assert seen and all(s == 0.3 / 1.5 for _, s in seen), seen
    assert seen[0][0] == q.data_ptr()  # the caller's queries, read in place
    seen.clear()
    with torch.no_grad():
        first = attention(q * (0.3 / 1.5), k, v, pattern=pat, scale=1.0)
    assert all(s == 1.0 for _, s in seen)
    assert torch.equal(out, first)
    ref = dense_reference(q.double(), k.double(), v.double(), pat.to_dense(100, 100),
                          scale=0.3 / 1.5)[0]
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    seen.clear()
    with torch.no_grad():  # weights: the forward's own probabilities, from the same scores
        out_w, w = attention(q, k, v, pattern=pat, scale=0.3, temperature=1.5,
                             return_weights=True)
        _, w_first = attention(q * (0.3 / 1.5), k, v, pattern=pat, return_weights=True,
                               scale=1.0)
    assert seen[0][1] == 0.3 / 1.5 and torch.equal(out_w, out)
    assert torch.equal(w.values, w_first.values) and torch.equal(w.indices, w_first.indices)
    seen.clear()
    with torch.no_grad():
        attention(q, k, v, pattern=pat, scale=0.3, temperature=torch.tensor([1.0, 2, 0.5, 1.5]))
    assert seen and all(s == 1.0 for _, s in seen)
    seen.clear()
    qg = q.clone().requires_grad_()
    attention(qg, k, v, pattern=pat, scale=0.3).sum().backward()
    assert seen and all(s == 1.0 for _, s in seen) and qg.grad is not None


def test_raw_kernel_takes_a_query_scale():
    """band_forward(..., scale=s) on unscaled queries: the scores are s * q . k on both the lane
    path (fp32) and the GEMM path (fp64: alpha of the score product); a scale that is not a
    finite number is refused, by the wrapper and by the kernel itself."""
    for dtype in (torch.float32, torch.float64):
        q, k, v = (t.to(dtype) for t in _qkv(1, 4, 2, 60, 70, 8, 5, seed=9))
        qs = q.view(1, 2, 2, 60, 8)
        out, lse = native.band_forward(qs, k, v, -6, 4, 3, 50, scale=0.7)
        want, want_lse = native.band_forward(qs * 0.7, k, v, -6, 4, 3, 50)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(out, want, atol=tol, rtol=0)
        torch.testing.assert_close(lse, want_lse, atol=tol, rtol=0)
        lse_all = native.band_forward(qs, k, v, -6, 4, 0, 60, scale=0.7)[1]
        rows = torch.arange(60)
        n = (rows + 10 + 5).clamp(0, 70) - (rows + 10 - 6).clamp(0, 70)
        offs = torch.cumsum(n, 0) - n
        got, want_w = (torch.zeros(4, int(n.sum()), dtype=dtype) for _ in range(2))
        native.band_weights(qs, k, lse_all, -6, 4, got, offs, scale=0.7)
        native.band_weights(qs * 0.7, k, lse_all, -6, 4, want_w, offs)
        torch.testing.assert_close(got, want_w, atol=tol, rtol=0)
    for bad in (math.nan, math.inf, True, "1"):
        with pytest.raises(ValueError, match="scale"):
            native.band_forward(qs, k, v, -6, 4, 3, 50, scale=bad)
        with pytest.raises(ValueError, match="scale"):
            native.band_weights(qs, k, lse_all, -6, 4, got, offs, scale=bad)
    with pytest.raises(ValueError, match="scale must be finite"):  # the kernel's own check
        native._call(qs.reshape(1, 4, 60, 8), k, v, -6, 4, 0, 60, scale=math.inf)


def test_raw_kernel_reads_strided_slices_in_place():
    """Keys, values and queries as slices of longer tensors (batch / head strides other than
    the slice's own sizes) give what their contiguous copies give."""
    assert native.band_available()
    q, k, v = _qkv(2, 4, 2, 80, 90, 8, 6, seed=7)
    qs = (q / 8**0.5).view(2, 2, 2, 80, 8)
    sliced = native.band_forward(qs[:, :, :, 10:50], k[:, :, 5:70], v[:, :, 5:70], -3, 5, 0, 40)
    copied = native.band_forward(qs[:, :, :, 10:50].contiguous(), k[:, :, 5:70].contiguous(),
                                 v[:, :, 5:70].contiguous(), -3, 5, 0, 40)
    for a, b in zip(sliced, copied):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_row_ranges_of_the_raw_kernel():
    assert native.band_available()
    q, k, v = _qkv(2, 4, 2, 45, 50, 8, 6, seed=5)
    qs = (q / 8**0.5).view(2, 2, 2, 45, 8)
    out, lse = native.band_forward(qs, k, v, -3, 5, 10, 31)
    i, j = torch.arange(45).view(-1, 1), torch.arange(50).view(1, -1)
    rel = j - i - 5
    mask = (rel >= -3) & (rel <= 5)
    ref = dense_reference(q.double(), k.double(), v.double(), mask)[0][:, :, 10:31]
    assert out.shape == (2, 2, 2, 21, 6) and lse.shape == (2, 2, 2, 21)
    assert (out.reshape(2, 4, 21, 6).double() - ref).abs().max() < 1e-5


@settings(max_examples=25, deadline=None)
@given(lq=st.integers(1, 90), extra=st.integers(0, 20), w=st.integers(0, 40),
       causal=st.booleans(), groups=st.sampled_from([1, 2, 3]), d=st.integers(1, 20))
def test_random_bands_match_reference(lq, extra, w, causal, groups, d):
    assert native.band_available()
    pattern = P.sliding_window(w) & P.causal() if causal else P.sliding_window(w)
    lk = lq + extra
    q, k, v = _qkv(1, 2 * groups, 2, lq, lk, d, 3, seed=lq * 7 + w)
    out = attention(q, k, v, pattern=pattern)
    assert (out.double() - _ref(q, k, v, pattern)).abs().max() < 1e-5


def test_composed_pattern_uses_it_for_its_band_and_merges_exactly(calls):
    pattern = P.sliding_window(3) | P.global_tokens([5, 31])
    q, k, v = _qkv(1, 2, 2, 40, 40, 8, 8)
    out = attention(q, k, v, pattern=pattern)
    assert calls == [(-3, 3, 0, 40)]
    assert (out.double() - _ref(q, k, v, pattern)).abs().max() < 1e-5


def test_other_calls_keep_the_pytorch_kernels(calls):
    q, k, v = _qkv(1, 2, 2, 40, 40, 8, 8)
    attention(q.double(), k.double(), v.double(), pattern=P.sliding_window(3))  # fp64
    attention(q, k, v, pattern=P.sliding_window(3), dropout_p=0.5)  # dropout
    attention(q, k, v, pattern=P.sliding_window(3), score_mod=lambda s, b, h, i, j: s)
    assert calls == []


def test_disabled_by_environment_variable():
    """ATTNKIT_NATIVE=0 turns off every compiled kernel (band, short sequences, GEMV); the
    calls that would use them still work."""
    code = ("import attnkit.kernels.native as n; import torch, attnkit; "
            "from attnkit import patterns as P; q = torch.randn(4, 1, 8, 4); "
            "attnkit.attention(q, q, q, pattern=P.sliding_window(1)); "
            "attnkit.attention(q, q, q); "
            "print(n.band_available(), n.short_available(), n.gemv_available()); "
            "print(sorted({(k, s['available'], s['reason']) for k, s in "
            "n.kernel_status().items()}))")
    env = {**os.environ, "ATTNKIT_NATIVE": "0"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    first, status = res.stdout.strip().splitlines()
    assert first == "False False False"
    off = "disabled by ATTNKIT_NATIVE"
    assert status == str([(k, False, off) for k in ("band", "decode", "gemv", "short", "step")])


def test_failed_self_check_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(native, "_state", {})

    def broken():
        raise RuntimeError("self-check against a dense reference failed")

    monkeypatch.setattr(native, "_self_check", broken)
    with pytest.warns(RuntimeWarning, match="fused CPU band kernel unavailable"):
        assert native.band_available() is False
    q, k, v = _qkv(1, 2, 2, 20, 20, 8, 8)
    out = attention(q, k, v, pattern=P.sliding_window(3))
    assert (out.double() - _ref(q, k, v, P.sliding_window(3))).abs().max() < 1e-5


def test_a_nan_key_reaches_only_the_rows_that_see_it():
    """The fused kernel and the PyTorch band kernel give NaN on exactly the rows whose window
    holds the NaN key, as the dense reference does (the PyTorch kernel used to spread it over a
    block of 32 rows)."""
    assert native.band_available()
    q, k, v = _qkv(1, 2, 2, 100, 100, 8, 8, seed=3)
    k[0, 0, 40] = float("nan")
    pattern = P.sliding_window(2)
    ref = _ref(q, k, v, pattern)
    assert torch.isnan(ref[0, :2, :, 0]).nonzero()[:, 1].unique().tolist() == [38, 39, 40, 41,
                                                                              42]
    for fused in (True, False):
        saved = native._state["ok"]
        native._state["ok"] = fused
        try:
            out = attention(q, k, v, pattern=pattern)
        finally:
            native._state["ok"] = saved
        assert torch.equal(torch.isnan(out), torch.isnan(ref)), fused
        finite = ~torch.isnan(ref)
        assert (out.double()[finite] - ref[finite]).abs().max() < 1e-5


def test_band_forward_validates_its_inputs():
    assert native.band_available()
    q, k, v = _qkv(1, 2, 2, 20, 20, 8, 8)
    qs = q.view(1, 2, 1, 20, 8)
    with pytest.raises(ValueError, match="lo <= hi"):
        native.band_forward(qs, k, v, 3, -3, 0, 20)
    with pytest.raises(ValueError, match="q0 <= q1"):
        native.band_forward(qs, k, v, -3, 3, 5, 30)
    with pytest.raises(ValueError, match="k must be"):
        native.band_forward(qs, k[:, :1], v, -3, 3, 0, 20)
    with pytest.raises(TypeError, match="qs must be torch.float32 or torch.float64"):
        native.band_forward(qs.half(), k, v, -3, 3, 0, 20)
    with pytest.raises(TypeError, match="k must be torch.float64"):  # one dtype for all
        native.band_forward(qs.double(), k, v, -3, 3, 0, 20)
    with pytest.raises(TypeError, match="lo must be an int"):
        native.band_forward(qs, k, v, -3.0, 3, 0, 20)
    out, lse = native.band_forward(qs, k[:, :, :0], v[:, :, :0], -3, 3, 0, 20)  # no keys
    assert out.abs().max() == 0 and torch.isneginf(lse).all()


def test_self_check_is_retried_once_and_reported(monkeypatch):
    """A self-check that fails once is retried (the kernel stays on, no warning); one that
    fails twice disables the kernel with a warning naming it and the mismatch, and
    kernel_status reports why."""
    import warnings

    real = native._self_check
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise native._Mismatch("band output: max error 1 exceeds the tolerance 1e-4")
        real()

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_self_check", flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.band_available() is True
    assert len(calls) == 2

    def broken():
        raise native._Mismatch("band output: max error 0.5 exceeds the tolerance 1e-4")

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_self_check", broken)
    with pytest.warns(RuntimeWarning, match="fused CPU band kernel unavailable.*max error 0.5"):
        assert native.band_available() is False
    status = native.kernel_status()["band"]
    assert status["available"] is False and "max error 0.5" in status["reason"]


def test_self_check_tolerance_follows_the_problem():
    """The self-checks' tolerance grows with the head size and the magnitude of the scores and
    values; the kernel's own result is well inside it, a result from the wrong batch is not."""
    assert native.band_available()
    small = native._tolerance(native._EPS32, 8, 3.0, 40, 1.0)
    assert native._tolerance(native._EPS32, 128, 3.0, 40, 1.0) > small
    assert native._tolerance(native._EPS32, 8, 30.0, 40, 1.0) > small
    assert native._tolerance(native._EPS32, 8, 3.0, 40, 10.0) == pytest.approx(10 * small)
    q, k, v = _qkv(2, 2, 2, 30, 30, 8, 8, seed=4)
    out, lse = native._call(q, k, v, -3, 3, 0, 30)
    i, j = torch.arange(30).view(-1, 1), torch.arange(30).view(1, -1)
    mask = (j - i >= -3) & (j - i <= 3)
    native._check_attention("band", out, lse, q, k, v, 1.0, mask)
    with pytest.raises(native._Mismatch, match="band output: max error"):
        native._check_attention("band", out.flip(0), lse, q, k, v, 1.0, mask)


# ------------------------------------------------------------------------------ backward


def _native_band_fn(lo: int, hi: int):
    """The engine's differentiable fused band (structured._NativeBand) on grouped ``qs``."""
    comp = types.SimpleNamespace(band=(lo, hi))
    return lambda qs, k, v: structured._NativeBand.apply(qs, k, v, comp, None)


def _count_band_backward_calls(monkeypatch) -> list:
    """Wrap ``native.band_backward`` so a test can assert the compiled backward ran: the
    returned list gains one entry per call."""
    calls = []
    real = native.band_backward

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(native, "band_backward", spy)
    return calls


def _spy_band_forward_weights(monkeypatch) -> list[bool]:
    """Wrap ``native.band_forward``: the returned list gains, per call, whether that call
    wrote weights (a ``weights`` sink was passed)."""
    calls: list[bool] = []
    real = native.band_forward

    def spy(*a, **kw):
        calls.append(kw.get("weights") is not None)
        return real(*a, **kw)

    monkeypatch.setattr(native, "band_forward", spy)
    return calls


@pytest.mark.parametrize("lq, lk, lo, hi, groups, block, nseg", [
    (13, 13, -3, 2, 1, 64, 1),   # one block, one segment
    (21, 25, -2, 1, 2, 4, 3),    # Lk > Lq, GQA 2:1, several blocks and segments (halos)
    (17, 17, 0, 5, 1, 2, 9),     # keys ahead only, segments of 2 rows: halos span segments
    (14, 20, -9, -1, 1, 4, 2),   # keys behind only
])
def test_backward_gradcheck_fp64(lq, lk, lo, hi, groups, block, nseg, monkeypatch):
    """The compiled backward in fp64 against finite differences of its own forward (through the
    output and the log-sum-exp), with blocks and segments of rows (their halos merged)."""
    assert native.band_available()
    monkeypatch.setattr(native, "BLOCK", block)
    monkeypatch.setattr(native, "_band_segments", lambda *a: nseg)
    g = torch.Generator().manual_seed(lq)
    qs = torch.randn(2, 2, groups, lq, 3, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, lk, 3, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, lk, 2, generator=g, dtype=torch.float64)
    delta = lk - lq
    i = torch.arange(lq)
    assert ((i + delta + lo <= lk - 1) & (i + delta + hi >= 0)).all()  # no empty row (lse -inf)
    leaves = [t.requires_grad_() for t in (qs, k, v)]
    calls = _count_band_backward_calls(monkeypatch)
    assert torch.autograd.gradcheck(_native_band_fn(lo, hi), leaves, eps=1e-6, atol=1e-7)
    assert calls, "the compiled backward was not used"


def _dense_grads(q, k, v, mask, dout):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = dense_reference(*leaves, mask)[0]
    return torch.autograd.grad(out, leaves, dout.double())


@pytest.mark.parametrize("name", list(CASES))
def test_backward_matches_dense_autograd_fp32(name, monkeypatch):
    """fp32 gradients through the engine (fused forward and backward) against autograd through
    the dense reference, for every case of the forward tests (empty rows included)."""
    pattern, b, hq, hkv, lq, lk, d, dv = CASES[name]
    assert native.band_available()
    calls = _count_band_backward_calls(monkeypatch)
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dv, seed=2)
    dout = torch.randn(b, hq, lq, dv, generator=torch.Generator().manual_seed(9))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(attention(*leaves, pattern=pattern), leaves, dout)
    assert calls, "the compiled backward was not used"
    want = _dense_grads(q, k, v, pattern.to_dense(lq, lk), dout)
    for n, a, w in zip("qkv", got, want):
        assert torch.isfinite(a).all(), n
        assert (a.double() - w).abs().max() < 1e-4, n


def test_backward_of_a_merged_pattern_takes_the_lse_gradient():
    """In a union (band | global tokens) the band's partial result is merged through its
    log-sum-exp, so a gradient reaches the lse: the compiled backward must take it."""
    pattern = P.sliding_window(4) | P.global_tokens([3, 50])
    q, k, v = _qkv(2, 4, 2, 70, 70, 8, 8, seed=11)
    dout = torch.randn(2, 4, 70, 8, generator=torch.Generator().manual_seed(12))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(attention(*leaves, pattern=pattern), leaves, dout)
    want = _dense_grads(q, k, v, pattern.to_dense(70, 70), dout)
    for n, a, w in zip("qkv", got, want):
        assert (a.double() - w).abs().max() < 1e-4, n


def test_band_backward_validates_its_inputs():
    assert native.band_available()
    q, k, v = _qkv(1, 2, 2, 20, 20, 8, 8)
    qs = q.view(1, 2, 1, 20, 8)
    out, lse = native.band_forward(qs, k, v, -3, 3, 0, 20)
    with pytest.raises(ValueError, match="dout must have shape"):
        native.band_backward(qs, k, v, out[..., :4], lse, None, -3, 3)
    with pytest.raises(ValueError, match="lse must have shape"):
        native.band_backward(qs, k, v, out, lse[..., :5], None, -3, 3)
    with pytest.raises(TypeError, match="dout must be torch.float32"):
        native.band_backward(qs, k, v, out.double(), lse, None, -3, 3)
    with pytest.raises(TypeError, match="k must be torch.float32"):
        native.band_backward(qs, k.double(), v, out, lse, None, -3, 3)
    with pytest.raises(ValueError, match="lo <= hi"):
        native.band_backward(qs, k, v, out, lse, None, 3, -3)
    dq, dk, dv = native.band_backward(qs, k, v, torch.zeros_like(out), lse, None, -3, 3)
    assert dq.abs().max() == 0 and dk.abs().max() == 0 and dv.abs().max() == 0


# ------------------------------------------------------------------------ weights


def _weights_cases():
    """(pattern, b, hq, hkv, lq, lk, layout): every band pattern and union with the band
    written by the compiled kernel; GQA / MQA, batch > 1, Lk != Lq, empty rows. (Unions with
    edges mask their band, so they keep the PyTorch path: see test_engine.)"""
    return {
        "window, GQA 2:1, batch 2": (P.sliding_window(5), 2, 4, 2, 37, 37, "plain"),
        "window & causal, MQA": (P.sliding_window(6) & P.causal(), 1, 4, 1, 41, 41, "plain"),
        "window | global, transposed": (
            P.sliding_window(4) | P.global_tokens([0, 17, 39]), 2, 2, 2, 40, 40, "transposed"),
        "window | exponential, sliced": (
            P.sliding_window(3) | P.exponential(), 1, 4, 2, 50, 50, "sliced"),
        "window | exp | global, batch 3": (
            P.sliding_window(2) | P.exponential() | P.global_tokens([3]), 3, 2, 1, 33, 33,
            "plain"),
        "fewer queries than keys": (P.sliding_window(3), 1, 2, 2, 9, 30, "plain"),
        "more queries than keys: empty rows": (P.sliding_window(2) & P.causal(), 2, 2, 2, 30, 9,
                                               "plain"),
        "window | global, GQA 2:1, batch 2": (
            P.sliding_window(6) | P.global_tokens([2, 30]), 2, 4, 2, 45, 45, "sliced"),
        "window | global, empty rows": (
            (P.sliding_window(3) | P.global_tokens([1, 12])) & P.causal(), 1, 2, 1, 60, 40,
            "transposed"),
    }


def _weights_inputs(b, hq, hkv, lq, lk, layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":  # (B, L, H, D) storage read as (B, H, L, D)
        q = torch.randn(b, lq, hq, 8, generator=g, dtype=dtype).transpose(1, 2)
        k = torch.randn(b, lk, hkv, 8, generator=g, dtype=dtype).transpose(1, 2)
        v = torch.randn(b, lk, hkv, 5, generator=g, dtype=dtype).transpose(1, 2)
    elif layout == "sliced":  # slices of longer tensors, every other head
        q = torch.randn(b, 2 * hq, lq + 3, 8, generator=g, dtype=dtype)[:, ::2, 3:]
        k = torch.randn(b, 2 * hkv, lk + 2, 8, generator=g, dtype=dtype)[:, ::2, 1:-1]
        v = torch.randn(b, 2 * hkv, lk + 2, 5, generator=g, dtype=dtype)[:, ::2, 1:-1]
    else:
        q = torch.randn(b, hq, lq, 8, generator=g, dtype=dtype)
        k = torch.randn(b, hkv, lk, 8, generator=g, dtype=dtype)
        v = torch.randn(b, hkv, lk, 5, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(_weights_cases()))
def test_weights_written_by_the_band_kernel(name, dtype, monkeypatch):
    """The band's weights come from the compiled kernel, straight into CSR order: equal to
    to_dense() of the dense reference and to the PyTorch path (same indptr and indices)."""
    import attnkit.kernels.enumerate as enumerate_

    pat, b, hq, hkv, lq, lk, layout = _weights_cases()[name]
    q, k, v = _weights_inputs(b, hq, hkv, lq, lk, layout, dtype)
    assert native.band_available()
    seen = []
    real = native.band_weights
    monkeypatch.setattr(native, "band_weights", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    fused = _spy_band_forward_weights(monkeypatch)
    with torch.no_grad():
        out, w = attention(q, k, v, pattern=pat, return_weights=True)
    assert seen or any(fused), "the compiled band kernel wrote no weights"
    # fp32: the forward writes the band's weights (in a union normalized by the band's own
    # log-sum-exp, rescaled afterwards) and no second pass runs; fp64: the second pass
    assert (any(fused) and not seen) == (dtype == torch.float32), (fused, seen)
    mask = pat.to_dense(lq, lk)
    ref_out, ref_w = dense_reference(q.double(), k.double(), v.double(), mask)
    tol = 1e-10 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(w.to_dense().double(), ref_w, atol=tol, rtol=0)
    torch.testing.assert_close(out.double(), ref_out, atol=10 * tol, rtol=0)
    indptr, indices = pat.csr(lq, lk, q.device)
    assert torch.equal(w.indptr, indptr) and torch.equal(w.indices, indices)
    assert w.values.shape == (b, hq, indices.numel())
    monkeypatch.setattr(enumerate_, "_native_weights_ok", lambda *a: False)
    n_fast, n_fused = len(seen), sum(fused)
    with torch.no_grad():
        _, slow = attention(q, k, v, pattern=pat, return_weights=True)
    assert len(seen) == n_fast and sum(fused) == n_fused  # the PyTorch path really ran
    assert torch.equal(slow.indptr, w.indptr) and torch.equal(slow.indices, w.indices)
    torch.testing.assert_close(w.values, slow.values, atol=tol, rtol=0)


def test_weights_with_autograd_keep_the_pytorch_path(monkeypatch):
    """Weights that need a gradient are not written by the kernels (they have no backward)."""
    seen = []
    real = native.band_weights
    monkeypatch.setattr(native, "band_weights", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    fused = _spy_band_forward_weights(monkeypatch)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 20, 20, 8, 4))
    _, w = attention(q, k, v, pattern=P.sliding_window(3), return_weights=True)
    w.values.sum().backward()
    assert not seen and not any(fused) and q.grad is not None


@pytest.mark.parametrize("union", [False, True])
def test_forward_writes_weights_across_chunks(union, monkeypatch):
    """Chunks of rows (each a sub-problem with its own key slice) write their runs at the
    plan-wide offsets and keys (in a union, between the other components' keys of the row, and
    rescaled to the row's log-sum-exp): equal to the dense reference. A band alone runs over
    all rows in one call (the compiled kernel's buffers are per thread: chunks would only copy
    each one's output into the whole's)."""
    monkeypatch.setattr(structured, "CHUNK_ELEMENTS", 2000)
    q, k, v = _qkv(2, 4, 2, 150, 160, 8, 5)
    pat = P.sliding_window(7) & P.causal()
    if union:
        pat = pat | P.global_tokens([0, 70, 149]) | P.exponential()
    fused = _spy_band_forward_weights(monkeypatch)
    with torch.no_grad():
        _, w = attention(q, k, v, pattern=pat, return_weights=True)
    assert (len(fused) > 2 if union else len(fused) == 1) and all(fused)
    ref = dense_reference(q.double(), k.double(), v.double(), pat.to_dense(150, 160))[1]
    torch.testing.assert_close(w.to_dense().double(), ref, atol=2e-6, rtol=0)
    indptr, indices = pat.csr(150, 160, q.device)
    assert torch.equal(w.indptr, indptr) and torch.equal(w.indices, indices)


def test_band_forward_validates_its_weights_buffers():
    q, k, v = _qkv(1, 2, 2, 10, 10, 4, 3)
    qs = q.view(1, 2, 1, 10, 4)
    vals = torch.zeros(2, 30)
    offs = torch.arange(10) * 3
    with pytest.raises(ValueError, match="offsets"):  # the last row's 2 keys at 30, 31
        native.band_forward(qs, k, v, -1, 1, 0, 10, weights=(vals, offs + 3, None, 0))
    with pytest.raises(ValueError, match="offsets"):  # rows [2, 10) need 8 offsets
        native.band_forward(qs, k, v, -1, 1, 2, 10, weights=(vals, offs, None, 0))
    with pytest.raises(TypeError, match="key0"):
        native.band_forward(qs, k, v, -1, 1, 0, 10, weights=(vals, offs, None, -1))
    narrow = torch.full((30,), -7, dtype=torch.int32)
    with pytest.raises(ValueError, match="too narrow"):  # keys up to 2**31 + 4 in int32
        native.band_forward(qs, k, v, -1, 1, 0, 10, weights=(vals, offs, narrow, 2**31 - 5))
    assert bool((narrow == -7).all()) and bool((vals == 0).all())  # nothing written
    with pytest.raises(TypeError, match="indices"):
        native.band_forward(qs, k, v, -1, 1, 0, 10, weights=(vals, offs, narrow.short(), 0))
    native.band_forward(qs, k, v, -1, 1, 0, 10, weights=(vals, offs, narrow, 2**31 - 11))
    assert narrow[:2].tolist() == [2**31 - 11, 2**31 - 10] and int(narrow[28]) == 2**31 - 2
    vals.zero_()
    native.band_forward(qs, k, v, -1, 1, 2, 10, weights=(vals, offs[2:], None, 0))
    # rows 2..8 write 3 keys at 3 * i, row 9 its 2 keys at 27: nothing before 6 nor at 29
    assert bool((vals[:, :6] == 0).all()) and bool((vals[:, 29] == 0).all())
    assert bool((vals[:, 6:29] > 0).all())


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_band_weights_writes_only_the_rows_runs_and_validates(index_dtype):
    """Runs with gaps between them: the gaps keep their contents (the keys too, in 4- or
    8-byte indices); a run past the buffer, a wrong dtype or layout is refused before the
    kernel runs."""
    g = torch.Generator().manual_seed(3)
    qs = torch.randn(1, 2, 2, 12, 8, generator=g)
    k = torch.randn(1, 2, 12, 8, generator=g)
    lo, hi = -2, 1
    lse = torch.randn(1, 2, 2, 12, generator=g) + 3.0
    lse[0, 0, 1, 5] = -math.inf  # a row without mass: zeros
    rows = torch.arange(12)
    start = (rows + lo).clamp(0, 12)
    n = (rows + hi + 1).clamp(0, 12) - start
    offs = torch.cumsum(n + 2, 0) - n - 2 + 1
    ncols = int(offs[-1] + n[-1] + 2)
    vals = torch.full((4, ncols), 9.0)
    idx = torch.full((ncols,), -7, dtype=index_dtype)
    native.band_weights(qs, k, lse, lo, hi, vals, offs, idx)
    s = (qs @ k.unsqueeze(2).transpose(-1, -2)).reshape(4, 12, 12)
    want = torch.exp(s - lse.reshape(4, 12, 1))
    written = torch.zeros(ncols, dtype=torch.bool)
    for i in range(12):
        cols = torch.arange(int(start[i]), int(start[i] + n[i]))
        at = int(offs[i]) + torch.arange(int(n[i]))
        written[at] = True
        assert torch.equal(idx[at], cols)
        expect = want[:, i, cols]
        expect[1, :] = 0.0 if i == 5 else expect[1, :]
        torch.testing.assert_close(vals[:, at], expect, atol=1e-5, rtol=1e-5)
    assert bool((vals[:, ~written] == 9.0).all()) and bool((idx[~written] == -7).all())
    bad = offs.clone()
    bad[-1] = ncols - int(n[-1]) + 1  # last run one past the end
    with pytest.raises(ValueError, match="offsets"):
        native.band_weights(qs, k, lse, lo, hi, vals, bad, idx)
    bad[-1] = -1
    with pytest.raises(ValueError, match="offsets"):
        native.band_weights(qs, k, lse, lo, hi, vals, bad, idx)
    with pytest.raises(TypeError, match="values"):
        native.band_weights(qs, k, lse, lo, hi, vals.double(), offs, idx)
    with pytest.raises(ValueError, match="values"):
        native.band_weights(qs, k, lse, lo, hi, vals.t().contiguous().t(), offs, idx)
    with pytest.raises(ValueError, match="indices"):
        native.band_weights(qs, k, lse, lo, hi, vals, offs, idx[:-1])
    with pytest.raises(TypeError, match="offsets"):
        native.band_weights(qs, k, lse, lo, hi, vals, offs.int(), idx)
    with pytest.raises(ValueError, match="lse"):
        native.band_weights(qs, k, lse[..., :-1], lo, hi, vals, offs, idx)


@pytest.mark.parametrize("call", [
    "attnkit.attention(q, k, v, pattern=P.sliding_window(8) | P.global_tokens([0]))",
    "attnkit.attention(q, k, v)",  # dense over short sequences: the short kernel
])
def test_first_kernel_use_inside_activation_checkpointing(call):
    """A kernel's first call (which builds and self-checks it, with an autograd reference) may
    come from inside torch.utils.checkpoint: the check must not add saved tensors that the
    recomputation then misses (CheckpointError: a different number of tensors was saved)."""
    code = ("import torch, attnkit; from attnkit import patterns as P; "
            "from torch.utils.checkpoint import checkpoint; torch.manual_seed(0); "
            "q, k, v = (torch.randn(2, 2, 64, 16, requires_grad=True) for _ in range(3)); "
            f"f = lambda q, k, v: {call}; "
            "out = checkpoint(f, q, k, v, use_reentrant=False); out.sum().backward(); "
            "q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v)); "
            "f(q2, k2, v2).sum().backward(); "
            "print(torch.allclose(q.grad, q2.grad, atol=1e-5))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "True"


# ------------------------------------------------ the fp32 forward's vector lanes (issue 26)

# (lq, lk, lo, hi, d, dv, block, q0, q1): the forward runs LANES (16 with AVX-512F, 8 with
# AVX2) consecutive queries per vector, with tiles of 16 / 12 keys and output columns and
# tails of 4 and 1; a specialised D = 64 / Dv = 64 path and a generic one.
LANE_GEOMETRIES = [
    (300, 300, -128, 128, 64, 64, 64, 0, 300),   # the benchmark's shape, L not a block multiple
    (70, 70, -20, 20, 128, 64, 64, 0, 70),       # D = 128 (generic D), Dv = 64
    (53, 53, -7, 9, 17, 21, 5, 0, 53),           # odd D and Dv (tiles 16 + 4 + 1), block 5
    (40, 40, -2, 1, 3, 1, 64, 0, 40),            # window narrower than the lanes, Dv = 1
    (33, 33, 0, 0, 1, 5, 7, 3, 30),              # one key per row, D = 1, a row range
    (25, 60, 3, 40, 64, 70, 16, 0, 25),          # keys ahead only, Lk > Lq, Dv = 70
    (45, 20, -60, -30, 8, 64, 9, 0, 45),         # keys behind only, Lq > Lk: rows without keys
    (19, 19, -200, 200, 9, 13, 64, 0, 19),       # band wider than the sequence
]


@pytest.mark.parametrize("lq, lk, lo, hi, d, dv, block, q0, q1", LANE_GEOMETRIES)
def test_forward_lanes_match_fp64(lq, lk, lo, hi, d, dv, block, q0, q1, monkeypatch):
    """Output and log-sum-exp of the fp32 forward against the dense fp64 reference, for D and
    Dv off the vector widths, windows narrower than the lanes, blocks and rows that are not a
    multiple of them, and rows without any key (zeros, -inf)."""
    assert native.band_available()
    monkeypatch.setattr(native, "BLOCK", block)
    q, k, v = _qkv(2, 4, 2, lq, lk, d, dv, seed=lq + d)
    qs = (q / d**0.5).view(2, 2, 2, lq, d)
    out, lse = native.band_forward(qs, k, v, lo, hi, q0, q1)
    i, j = torch.arange(lq).view(-1, 1), torch.arange(lk).view(1, -1)
    rel = j - i - (lk - lq)
    mask = (rel >= lo) & (rel <= hi)
    kr, vr = (t.double().repeat_interleave(2, dim=1) for t in (k, v))
    s = (q.double() / d**0.5) @ kr.transpose(-1, -2)
    s = s.masked_fill(~mask, -math.inf)[:, :, q0:q1]
    ref_lse = torch.logsumexp(s, -1)
    ref = torch.softmax(s, -1).nan_to_num(0.0) @ vr
    assert out.shape == (2, 2, 2, q1 - q0, dv)
    torch.testing.assert_close(out.reshape(2, 4, q1 - q0, dv).double(), ref, atol=2e-6, rtol=0)
    empty = ~mask[q0:q1].any(-1)
    got = lse.reshape(2, 4, q1 - q0).double()
    assert torch.isneginf(got[..., empty]).all() and (out.reshape(2, 4, q1 - q0, dv)[..., empty, :]
                                                     == 0).all()
    torch.testing.assert_close(got[..., ~empty], ref_lse[..., ~empty], atol=2e-6, rtol=1e-6)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA flags")
@pytest.mark.parametrize("flags", [["-mno-avx512f"], ["-mno-avx512f", "-mno-avx2", "-mno-fma"]])
def test_forward_lanes_on_narrower_instruction_sets(flags):
    """The same checks with the library built for AVX2 only (8 lanes) and for neither AVX2 nor
    FMA (the GEMM path): a machine without AVX-512 compiles these (-march=native there)."""
    tests = ["test_forward_lanes_match_fp64", "test_weights_written_by_the_band_kernel"]
    assert passed_with_isa_flags(flags, __file__, tests) > len(LANE_GEOMETRIES)


@pytest.mark.parametrize("other", ["global", "exponential", "exponential|global", "random"])
def test_union_weights_reuse_the_forwards_scores(other, monkeypatch):
    """In a union with a band, the other components' kernels hand their scores to the weights
    (no second scoring pass), except kernels that do not (edges: random keys), whose pairs are
    scored once more, chunk by chunk: both equal to the dense reference (batch 2, GQA 2:1,
    several chunks)."""
    monkeypatch.setattr(structured, "CHUNK_ELEMENTS", 4000)
    extra = {"global": P.global_tokens([0, 41, 119]), "exponential": P.exponential(),
             "exponential|global": P.exponential() | P.global_tokens([5]),
             "random": P.random_keys(3, seed=2)}[other]
    pat = P.sliding_window(5) | extra
    q, k, v = _qkv(2, 4, 2, 120, 120, 8, 5)
    second = []
    real = structured.component_scores
    monkeypatch.setattr(structured, "component_scores", lambda c, *a, **kw: second.append(
        type(c).__name__) or real(c, *a, **kw))
    with torch.no_grad():
        _, w = attention(q, k, v, pattern=pat, return_weights=True)
    assert set(second) == ({"Edges"} if other == "random" else set()), second
    ref = dense_reference(q.double(), k.double(), v.double(), pat.to_dense(120, 120))[1]
    torch.testing.assert_close(w.to_dense().double(), ref, atol=2e-6, rtol=0)
    indptr, indices = pat.csr(120, 120)
    assert torch.equal(w.indptr, indptr) and torch.equal(w.indices, indices)


@settings(max_examples=60, deadline=None)
@given(lq=st.integers(1, 40), extra=st.integers(-10, 10), lo=st.integers(-6, 3),
       width=st.integers(0, 6), q0=st.integers(0, 39), nq=st.integers(0, 40),
       nlists=st.integers(0, 3), seed=st.integers(0, 10**6), blocks=st.integers(1, 5),
       team=st.sampled_from([(1, 0), (2, 0), (3, 0), (3, 1), (4, 2)]),
       index_dtype=st.sampled_from([torch.int64, torch.int32]))
def test_union_layout_matches_a_sorted_listing(lq, extra, lo, width, q0, nq, nlists, seed,
                                               blocks, team, index_dtype):
    """union_layout (compiled) against the CSR order of a plain sort: rows' slots, band runs,
    the other keys' slots and indices (4- or 8-byte), for random disjoint key lists off the
    band, Lk != Lq, the rows cut into blocks laid out by teams of 1-4 threads (some of which
    do not start)."""
    lk = max(1, lq + extra)
    hi = lo + width
    q0 = min(q0, lq)
    nq = min(nq, lq - q0)
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(q0, q0 + nq)
    start = (rows + lk - lq + lo).clamp(0, lk)
    stop = torch.maximum((rows + lk - lq + hi + 1).clamp(0, lk), start)
    cols = torch.arange(lk)
    off_band = ~((cols >= start.view(-1, 1)) & (cols < stop.view(-1, 1)))
    owner = torch.randint(-1, max(nlists, 1), (nq, lk), generator=g).masked_fill(~off_band, -1)
    if nlists == 0:
        owner.fill_(-1)
    key = rows.view(-1, 1) * lk + cols
    keys = [key[owner == j] for j in range(nlists)]  # row-major: sorted
    bound = int((stop - start).sum()) + sum(t.numel() for t in keys) + 3
    indptr, offs = torch.empty(nq, dtype=torch.long), torch.empty(nq, dtype=torch.long)
    indices = torch.full((bound,), -1, dtype=index_dtype)
    with thread_team(*team):
        pos, nnz = native.union_layout(indptr, offs, indices, keys, q0, lq, lk, lo, hi, 3,
                                       blocks=blocks)
    # the reference: every pair of these rows (band and others) sorted by key
    band = (~off_band) & torch.ones(nq, lk, dtype=torch.bool)
    allk = key[band | (owner >= 0)]
    assert nnz == 3 + allk.numel()
    where = {int(x): 3 + i for i, x in enumerate(allk.tolist())}
    counts = (band | (owner >= 0)).sum(1)
    assert torch.equal(indptr, 3 + torch.cumsum(counts, 0) - counts)
    for r in range(nq):
        if stop[r] > start[r]:
            assert int(offs[r]) == where[int(rows[r]) * lk + int(start[r])]
    for t, p in zip(keys, pos):
        assert [where[int(x)] for x in t.tolist()] == p.tolist()
        assert torch.equal(indices[p], t % lk)


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_union_layout_rejects_bad_lists(blocks):
    """Unsorted keys, keys on the band or outside the rows, and too small a buffer: errors,
    nothing written past the buffer, whatever the rows' blocks."""
    def run(keys, bound=50):
        return native.union_layout(torch.empty(4, dtype=torch.long),
                                   torch.empty(4, dtype=torch.long),
                                   torch.empty(bound, dtype=torch.long),
                                   [torch.tensor(k, dtype=torch.long) for k in keys],
                                   0, 10, 10, 0, 1, 0, blocks=blocks)  # rows 0-3 of 10
    pos, nnz = run([[5, 9, 17]])  # row 0: keys 5, 9; row 1: key 7 (band: 0-1 / 1-2)
    assert nnz == 4 * 2 + 3 and pos[0].tolist() == [2, 3, 6]
    with pytest.raises(ValueError, match="sorted"):
        run([[17, 25, 9]])  # rows 1, 2, then row 0 again
    for bad in (0, native.UNION_MAX_BLOCKS + 1, 2.0):
        with pytest.raises(ValueError, match="blocks"):
            native.union_layout(torch.empty(4, dtype=torch.long),
                                torch.empty(4, dtype=torch.long),
                                torch.empty(9, dtype=torch.long), [], 0, 10, 10, 0, 1, 0,
                                blocks=bad)
    with pytest.raises(ValueError, match="sorted"):
        run([[9, 5]])
    with pytest.raises(ValueError, match="disjoint"):
        run([[5, 9], [9]])  # key 9 of row 0 in two lists
    with pytest.raises(ValueError, match="band"):
        run([[0]])  # row 0's band is keys 0-1
    with pytest.raises(ValueError, match="within the rows"):
        run([[45]])  # row 4: past the 4 rows
    with pytest.raises(RuntimeError, match="slots"):
        run([[5, 9, 17]], bound=6)
    with pytest.raises(TypeError, match="keys"):
        native.union_layout(torch.empty(4, dtype=torch.long), torch.empty(4, dtype=torch.long),
                            torch.empty(9, dtype=torch.long), [torch.tensor([5.0])], 0, 10, 10,
                            0, 1, 0)


# ------------------------------------- the fp32 forward on the tile matrix unit (AMX, issue 26)


@pytest.fixture()
def amx(monkeypatch):
    """The matrix-unit path is on (skips where the CPU or OS has none: the vector path, tested
    above, serves there)."""
    monkeypatch.delenv("ATTNKIT_AMX", raising=False)
    assert native.band_available()
    if not native.matrix_unit_available():
        pytest.skip("no AMX tile unit here (or not granted by the OS)")


def _band_ref(q, k, v, lo, hi, q0, q1, scale):
    """fp64 output and lse of rows [q0, q1) for q (B, Hq, Lq, D), k / v (B, Hkv, Lk, .)."""
    lq, lk, g = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    i, j = torch.arange(lq).view(-1, 1), torch.arange(lk).view(1, -1)
    rel = j - i - (lk - lq)
    mask = (rel >= lo) & (rel <= hi)
    kr, vr = (t.double().repeat_interleave(g, dim=1) for t in (k, v))
    s = (scale * q.double()) @ kr.transpose(-1, -2)
    s = s.masked_fill(~mask, -math.inf)[:, :, q0:q1]
    return torch.softmax(s, -1).nan_to_num(0.0) @ vr, torch.logsumexp(s, -1), mask[q0:q1]


# (lq, lk, lo, hi, d, dv, block, q0, q1): D of 32 and 64, Dv from one output tile (16) to
# several 32-column passes and a lone 16-column one, groups of 16 queries off the key tiles'
# 16 / 32 boundaries (block 5, 9), rows without keys, a row range, and a sequence long enough
# for the per-thread ring of packed keys to wrap around many times.
AMX_GEOMETRIES = [
    (300, 300, -128, 128, 64, 64, 64, 0, 300),
    (70, 70, -20, 20, 32, 48, 16, 0, 70),
    (53, 80, -7, 9, 64, 16, 5, 0, 53),
    (45, 20, -60, -30, 64, 64, 9, 0, 45),
    (19, 19, -200, 200, 64, 128, 64, 0, 19),
    (200, 200, 0, 0, 64, 32, 64, 3, 190),
    (130, 130, -100, 37, 32, 80, 64, 17, 129),
    (900, 900, -40, 40, 64, 64, 64, 0, 900),
]


@pytest.mark.parametrize("lq, lk, lo, hi, d, dv, block, q0, q1", AMX_GEOMETRIES)
def test_matrix_unit_forward_matches_fp64(lq, lk, lo, hi, d, dv, block, q0, q1, amx,
                                          monkeypatch):
    """Output and lse of the AMX forward against the dense fp64 reference, with the same
    tolerance as the vector path's, and against the vector path (ATTNKIT_AMX=0) itself."""
    monkeypatch.setattr(native, "BLOCK", block)
    q, k, v = _qkv(2, 4, 2, lq, lk, d, dv, seed=lq + d)
    qs = q.view(2, 2, 2, lq, d)
    out, lse = native.band_forward(qs, k, v, lo, hi, q0, q1, scale=d**-0.5)
    ref, ref_lse, mask = _band_ref(q, k, v, lo, hi, q0, q1, d**-0.5)
    out, lse = out.reshape(ref.shape).double(), lse.reshape(ref_lse.shape).double()
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    empty = ~mask.any(-1)
    assert torch.isneginf(lse[..., empty]).all() and (out[..., empty, :] == 0).all()
    torch.testing.assert_close(lse[..., ~empty], ref_lse[..., ~empty], atol=2e-6, rtol=1e-6)
    monkeypatch.setenv("ATTNKIT_AMX", "0")
    vec, _ = native.band_forward(qs, k, v, lo, hi, q0, q1, scale=d**-0.5)
    torch.testing.assert_close(out, vec.reshape(ref.shape).double(), atol=3e-6, rtol=0)
    if lq * dv >= 300 * 64:  # other rounding: evidence the other path ran
        assert not torch.equal(out.float(), vec.reshape(ref.shape))


def test_matrix_unit_splits_are_exact_at_extreme_magnitudes(amx):
    """Queries near 1e30 against keys near 1e-30 (products of size 1: the bf16 parts carry the
    exponent), logits of size ~1e4, and values near 1e-20: all within fp32 rounding of the
    fp64 reference."""
    q, k, v = _qkv(1, 2, 2, 96, 96, 64, 32, seed=5)
    for qf, kf, vf in ((1e30, 1e-30, 1.0), (60.0, 60.0, 1.0), (1.0, 1.0, 1e-20)):
        qx, kx, vx = q * qf, k * kf, v * vf
        out, lse = native.band_forward(qx.view(1, 2, 1, 96, 64), kx, vx, -17, 30, 0, 96,
                                       scale=0.125)
        ref, ref_lse, _ = _band_ref(qx, kx, vx, -17, 30, 0, 96, 0.125)
        torch.testing.assert_close(out.reshape(ref.shape).double(), ref,
                                   atol=2e-6 * vf, rtol=1e-5)
        smax = float(ref_lse.abs().max())
        torch.testing.assert_close(lse.reshape(ref_lse.shape).double(), ref_lse,
                                   atol=4e-7 * (1 + smax), rtol=0)


def test_matrix_unit_nan_key_reaches_only_the_rows_that_see_it(amx):
    """A NaN key gives NaN on exactly the rows whose band holds it (AMX computes whole tiles of
    16 keys and chunks of 32: the others mask it out)."""
    q, k, v = _qkv(1, 2, 2, 100, 100, 64, 16, seed=3)
    k[0, 0, 40] = float("nan")
    out, _ = native.band_forward(q.view(1, 2, 1, 100, 64), k, v, -2, 2, 0, 100, scale=0.125)
    rows = torch.isnan(out[0, 0, 0, :, 0]).nonzero().flatten().tolist()
    assert rows == [38, 39, 40, 41, 42]
    assert not torch.isnan(out[0, 1]).any()


@pytest.mark.parametrize("pattern", ["window", "window|global"])
def test_matrix_unit_writes_the_weights(pattern, amx):
    """return_weights=True at D = 64: the weights the AMX forward writes equal the dense
    reference's (and the output too)."""
    pat = P.sliding_window(40) if pattern == "window" else (P.sliding_window(40)
                                                           | P.global_tokens([3, 77]))
    q, k, v = _qkv(2, 4, 2, 150, 150, 64, 32, seed=11)
    with torch.no_grad():
        out, w = attention(q, k, v, pattern=pat, return_weights=True)
    ref_out, ref_w = dense_reference(q.double(), k.double(), v.double(), pat.to_dense(150, 150))
    torch.testing.assert_close(w.to_dense().double(), ref_w, atol=2e-6, rtol=0)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=0)


def test_matrix_unit_switch_and_status(monkeypatch):
    """ATTNKIT_AMX=0 turns the matrix unit off; kernel_status reports whether it is in use."""
    assert native.band_available()
    monkeypatch.setenv("ATTNKIT_AMX", "0")
    assert not native.matrix_unit_available()
    assert native.kernel_status()["band"]["matrix_unit"] is False
    monkeypatch.delenv("ATTNKIT_AMX")
    assert native.kernel_status()["band"]["matrix_unit"] == native.matrix_unit_available()


def test_build_without_the_tile_instructions_falls_back_to_the_vector_path(tmp_path):
    """A compiler (assembler) that fails on the AMX code: the band library is built again with
    -DATTNKIT_NO_AMX, the kernel is available and checked, and the matrix unit is off."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    wrapper = tmp_path / "cc"
    wrapper.write_text("#!/bin/sh\n"
                       'case " $* " in *" -DATTNKIT_NO_AMX "*) exec ' + cc + ' "$@";; esac\n'
                       'case "$*" in *band_cpu.c*) echo "no tile instructions" >&2; exit 1;; esac\n'
                       'exec ' + cc + ' "$@"\n')
    wrapper.chmod(0o755)
    code = ("import attnkit.kernels.native as n; "
            "print(n.band_available(), n.matrix_unit_available())")
    env = {**os.environ, "CC": str(wrapper), "ATTNKIT_CACHE": str(tmp_path / "cache")}
    env.pop("ATTNKIT_AMX", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "False"]
    built = sorted(p.name for p in (tmp_path / "cache").glob("band_cpu-*.so"))
    assert len(built) == 1, built


# ------------------------------------------------ weights buffers that reuse earlier memory


@pytest.fixture()
def recycling(monkeypatch):
    """recycled_empty for buffers of any size, its kept buffers emptied before and after."""
    monkeypatch.delenv("ATTNKIT_WEIGHTS_POOL", raising=False)
    monkeypatch.setattr(native, "RECYCLE_MIN_BYTES", 1)
    monkeypatch.setattr(native, "_recycled", [])
    yield
    native._recycled.clear()


def test_recycled_empty_reuses_only_memory_nothing_holds(recycling, monkeypatch):
    a = native.recycled_empty((1000,), torch.float32)
    a.fill_(7.0)
    view, pa = a[100:200], a.data_ptr()
    del a
    b = native.recycled_empty((1000,), torch.float32)  # a view still holds the first one
    assert b.data_ptr() != pa and (view == 7.0).all()
    del view
    c = native.recycled_empty((700, 1), torch.float32)  # fits, and over half its size
    assert c.data_ptr() == pa and c.shape == (700, 1) and c.is_contiguous()
    del c
    d = native.recycled_empty((100,), torch.int32)  # under half of either: fresh memory
    assert d.data_ptr() not in (pa, b.data_ptr()) and d.dtype == torch.int32
    # the oldest (b's, still held: freed with b) was let go; kept: the first (free) and d's
    assert len(native._recycled) == native.RECYCLE_KEEP
    assert native.release_recycled() == 4000 and len(native._recycled) == 1
    assert native.release_recycled() == 0  # d holds the other
    del d
    assert native.release_recycled() == 400 and not native._recycled
    monkeypatch.setenv("ATTNKIT_WEIGHTS_POOL", "0")
    native.recycled_empty((1000,), torch.float32)
    assert not native._recycled  # plain torch.empty, nothing kept


def test_weights_reuse_the_memory_of_earlier_weights(recycling):
    """return_weights twice: the second call's buffers are the first's once those are gone,
    and fresh ones while the first weights are still held (which stay unchanged)."""
    pat = P.sliding_window(6)
    q, k, v = _qkv(1, 2, 2, 50, 50, 8, 8, seed=4)
    q2, k2, v2 = _qkv(1, 2, 2, 50, 50, 8, 8, seed=5)
    mask = pat.to_dense(50, 50)
    with torch.no_grad():
        _, w1 = attention(q, k, v, pattern=pat, return_weights=True)
        first, ptr = w1.values.clone(), w1.values.data_ptr()
        _, w2 = attention(q2, k2, v2, pattern=pat, return_weights=True)
        assert w2.values.data_ptr() != ptr and torch.equal(w1.values, first)
        ptr2 = w2.values.data_ptr()
        del w1, w2
        _, w3 = attention(q2, k2, v2, pattern=pat, return_weights=True)
    assert w3.values.data_ptr() == ptr2  # the kept buffers are the last call's
    ref = dense_reference(q2.double(), k2.double(), v2.double(), mask)[1]
    torch.testing.assert_close(w3.to_dense().double(), ref, atol=2e-6, rtol=0)
