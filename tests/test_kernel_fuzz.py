"""Layout and threading fuzzer for the compiled kernels (attnkit.kernels.native).

Hypothesis builds q/k/v, caches, GEMV inputs, weights' biases, LayerNorm vectors, residuals and
rotary tables as arbitrary legal views: permuted storage (transposes), offset and stepped slices
of larger buffers padded with NaN (so any element read from outside the view shows), stride-0
expanded dims, size-1 dims with odd strides (up to 10**6 elements: a kernel stepping by one
reads far outside and crashes), batch > 1 with grouped- and multi-query heads. Every kernel path
(band forward and backward, offsets/dilated, short sequences forward and backward, split-K
decoding, GEMV) is compared with the fp64 dense reference and with the PyTorch paths the engine
takes when the compiled kernels are off (as with ``ATTNKIT_NATIVE=0``). Each example also draws
the thread count (``torch.set_num_threads``) and a forced smaller team
(:func:`native.set_team_limit`: the work is cut for the team asked for, fewer threads start).

The hypothesis tests run in a child process started by :func:`test_fuzz_in_a_subprocess`, so a
kernel that crashes fails that test instead of killing pytest; they are skipped in the parent.
``ATTNKIT_FUZZ_EXAMPLES`` sets the examples per test (default 10: a few seconds each; raise it for a
longer hunt).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import thread_team
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnkit import attention, dense_reference
from attnkit import patterns as P
from attnkit.kernels import native
from attnkit.kernels.structured import lower
from attnkit.nn.attention import split_linear

HAS_CC = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
CHILD = os.environ.get("ATTNKIT_FUZZ_CHILD") == "1"
EXAMPLES = int(os.environ.get("ATTNKIT_FUZZ_EXAMPLES", "10"))
ROOT = Path(__file__).resolve().parents[1]

child_only = pytest.mark.skipif(not CHILD, reason="run in a child process by "
                                "test_fuzz_in_a_subprocess")
fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
pytestmark = [
    pytest.mark.skipif(not HAS_CC, reason="no C compiler: the native kernels are optional"),
    pytest.mark.skipif(native._native_disabled(), reason="ATTNKIT_NATIVE=0: kernels turned off"),
]

NAN = float("nan")


# ------------------------------------------------------------------------------ strategies


@st.composite
def views(draw, shape, dtype=torch.float32, expand=True):
    """``(view, values)``: a tensor of ``shape`` laid out as an arbitrary legal view, and its
    values as a contiguous fp64 tensor."""
    n = len(shape)
    seed = draw(st.integers(0, 2**31 - 1))
    # stride-0 dims: one value broadcast along the dim (inputs only)
    bdims = {i for i in range(n) if expand and shape[i] > 1
             and draw(st.integers(0, 3)) == 0}
    vshape = [1 if i in bdims else s for i, s in enumerate(shape)]
    vals = torch.randn(vshape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    vals = vals.to(dtype)  # values exactly representable in dtype
    if draw(st.booleans()):  # a contiguous buffer (odd strides only on size-1 dims, below)
        perm, steps, offs, pads = list(range(n)), [1] * n, [0] * n, [0] * n
    else:  # transposed, sliced with an offset and a step from a larger buffer
        perm = draw(st.permutations(range(n)))
        steps = [draw(st.integers(1, 2)) for _ in range(n)]
        offs = [draw(st.integers(0, 2)) for _ in range(n)]
        pads = [draw(st.integers(0, 1)) for _ in range(n)]
    spans = [(vshape[i] - 1) * steps[i] + 1 if vshape[i] else 0 for i in range(n)]
    base_shape = [offs[i] + spans[i] + pads[i] for i in range(n)]
    base = torch.full([base_shape[p] for p in perm], NAN, dtype=dtype)  # padding reads as NaN
    inverse = sorted(range(n), key=perm.__getitem__)
    view = base.permute(*inverse)[tuple(slice(offs[i], offs[i] + spans[i], steps[i])
                                        for i in range(n))]
    view.copy_(vals)
    if any(s == 1 for s in view.shape) and draw(st.booleans()):
        # size-1 dims with odd strides: their index is always 0, so any stride is legal
        strides = [draw(st.sampled_from([0, 3, 10**6])) if view.shape[i] == 1 else view.stride(i)
                   for i in range(n)]
        view = view.as_strided(view.shape, strides, view.storage_offset())
    view = view.expand(*shape)
    assert torch.equal(view, vals.expand(*shape))
    return view, vals.double().expand(*shape)


threads = st.sampled_from([1, 2, 3, 4])
team_limits = st.sampled_from([0, 0, 1, 2])




_STATES = ("_state", "_decode_state", "_short_state", "_gemv_state")


@contextlib.contextmanager
def natives_off():
    """The engine's dispatch as with ``ATTNKIT_NATIVE=0`` (every compiled kernel off)."""
    saved = {name: getattr(native, name)["ok"] for name in _STATES}
    try:
        for name in _STATES:
            getattr(native, name)["ok"] = False
        yield
    finally:
        for name, ok in saved.items():
            getattr(native, name)["ok"] = ok


@contextlib.contextmanager
def spy(name: str):
    """Count the calls of ``native.<name>``."""
    real, seen = getattr(native, name), []

    def counted(*a, **kw):
        seen.append(1)
        return real(*a, **kw)

    setattr(native, name, counted)
    try:
        yield seen
    finally:
        setattr(native, name, real)


def _close(got, want, atol, what=""):
    got = got.double()
    assert got.shape == want.shape, what
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN where not expected"
    err = (got - want).nan_to_num(0.0).abs().max().item() if got.numel() else 0.0
    assert err <= atol, f"{what}: max error {err:.3g} > {atol:.3g}"


def _ensure_all():
    status = native.kernel_status()
    assert all(s["available"] for s in status.values()), status


# ------------------------------------------------------------------------------ fuzz tests

# head sizes: odd ones (the vector lanes' tails) and those the forward runs on AMX where the CPU
# has it (D of 32 or 64, Dv a multiple of 16)
head_sizes = st.one_of(st.integers(1, 17), st.sampled_from([32, 64]))
value_sizes = st.one_of(st.integers(1, 9), st.sampled_from([16, 48]))


@child_only
@fuzz
@given(data=st.data(), b=st.integers(1, 2), hkv=st.integers(1, 2), g=st.integers(1, 3),
       lq=st.integers(1, 80), extra=st.integers(0, 10), d=head_sizes, dv=value_sizes,
       w=st.integers(0, 20), causal=st.booleans(), n=threads, limit=team_limits,
       scale=st.sampled_from([None, 1.0, 0.37]))
def test_band(data, b, hkv, g, lq, extra, d, dv, w, causal, n, limit, scale):
    """The fused band forward (no autograd: the kernel scales the queries it reads in place,
    whatever their layout; on AMX where D is 32 or 64 and Dv a multiple of 16) against the fp64
    dense reference and the PyTorch kernels."""
    _ensure_all()
    lk = lq + extra
    q, q64 = data.draw(views((b, hkv * g, lq, d)))
    k, k64 = data.draw(views((b, hkv, lk, d)))
    v, v64 = data.draw(views((b, hkv, lk, dv)))
    pattern = P.sliding_window(w) & P.causal() if causal else P.sliding_window(w)
    ref = dense_reference(q64, k64, v64, pattern.to_dense(lq, lk), scale=scale)[0]
    with thread_team(n, limit), spy("band_forward") as calls:
        out = attention(q, k, v, pattern=pattern, scale=scale)
    # (a causal window may be planned with a mask term, which the PyTorch band kernel serves)
    assert calls or causal, "the fused band kernel was not used"
    _close(out, ref, 1e-4, "band vs fp64")
    with natives_off():
        _close(out, attention(q, k, v, pattern=pattern, scale=scale).double(), 1e-4,
               "band vs PyTorch")


@child_only
@fuzz
@given(data=st.data(), b=st.integers(1, 2), hkv=st.integers(1, 2), g=st.integers(1, 3),
       lq=st.integers(1, 80), extra=st.integers(0, 10), d=st.integers(1, 17),
       dv=st.integers(1, 9), w=st.integers(0, 20),
       kind=st.sampled_from(["window", "causal window", "window|global"]),
       block=st.sampled_from([4, 64]), n=threads, limit=team_limits)
def test_band_backward(data, b, hkv, g, lq, extra, d, dv, w, kind, block, n, limit):
    """Gradients through the fused band forward and backward (segments of rows per head, their
    halos merged; a gradient on the lse when the band is merged with global tokens) with q/k/v
    and the output gradient as views, against autograd through the fp64 dense reference and
    through the engine's PyTorch kernels."""
    _ensure_all()
    lk = lq + extra
    q, q64 = data.draw(views((b, hkv * g, lq, d)))
    k, k64 = data.draw(views((b, hkv, lk, d)))
    v, v64 = data.draw(views((b, hkv, lk, dv)))
    dout, dout64 = data.draw(views((b, hkv * g, lq, dv)))
    pattern = {"window": P.sliding_window(w), "causal window": P.sliding_window(w) & P.causal(),
               "window|global": P.sliding_window(w) | P.global_tokens([0, lk // 2])}[kind]
    mask = pattern.to_dense(lq, lk)
    rows = mask.any(1)  # rows without keys: zero output, zero gradient
    leaves = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    ref = dense_reference(*leaves, mask)[0]
    want = torch.autograd.grad(ref, leaves, dout64 * rows[:, None])

    def grads():
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(attention(*ins, pattern=pattern), ins, dout)

    old_block = native.BLOCK
    native.BLOCK = block  # blocks of 4 rows: many segments and halos on small problems
    try:
        with thread_team(n, limit), spy("band_backward") as calls:
            got = grads()
    finally:
        native.BLOCK = old_block
    assert calls or kind == "causal window", "the compiled band backward was not used"
    for name, a, w_ in zip("qkv", got, want):
        _close(a, w_, 1e-4 * (1 + float(w_.abs().max())), f"d{name} vs fp64")
    with natives_off():
        for name, a, w_ in zip("qkv", got, grads()):
            _close(a, w_.double(), 1e-4 * (1 + float(w_.abs().max())), f"d{name} vs PyTorch")


@child_only
@fuzz
@given(data=st.data(), b=st.integers(1, 2), hkv=st.integers(1, 2), g=st.integers(1, 3),
       lq=st.integers(1, 80), extra=st.integers(-10, 10), d=head_sizes,
       w=st.integers(0, 20),
       kind=st.sampled_from(["window", "causal window", "window|global", "window|exponential"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), block=st.sampled_from([4, 64]),
       n=threads, limit=team_limits)
def test_band_weights(data, b, hkv, g, lq, extra, d, w, kind, dtype, block, n, limit):
    """return_weights=True with the band's weights written by the compiled kernel into CSR
    order (q/k as views; Lk below or above Lq: empty rows), against to_dense() of the fp64
    dense reference and against the engine with the compiled kernels off."""
    _ensure_all()
    lk = max(1, lq + extra)
    q, q64 = data.draw(views((b, hkv * g, lq, d), dtype))
    k, k64 = data.draw(views((b, hkv, lk, d), dtype))
    v, v64 = data.draw(views((b, hkv, lk, 3 if d % 32 else 16), dtype))  # D 32 / 64: AMX
    pattern = {"window": P.sliding_window(w), "causal window": P.sliding_window(w) & P.causal(),
               "window|global": P.sliding_window(w) | P.global_tokens([0, lk // 2]),
               "window|exponential": P.sliding_window(w) | P.exponential()}[kind]
    ref = dense_reference(q64, k64, v64, pattern.to_dense(lq, lk))[1]
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    old_block, real_forward, fused = native.BLOCK, native.band_forward, []

    def forward(*a, **kw):  # the forward writing the weights as it computes them
        fused.append(kw.get("weights") is not None)
        return real_forward(*a, **kw)

    native.BLOCK, native.band_forward = block, forward
    try:
        with thread_team(n, limit), torch.no_grad(), spy("band_weights") as calls:
            _, wt = attention(q, k, v, pattern=pattern, return_weights=True)
    finally:
        native.BLOCK, native.band_forward = old_block, real_forward
    plan = lower(pattern.plan(lq, lk), lq, lk)  # small problems may plan without a band
    assert calls or any(fused) or not any(getattr(c, "band", None) and not c.masks
                                          for c in plan), kind
    _close(wt.to_dense(), ref, atol, f"{kind} weights vs fp64")
    with natives_off(), torch.no_grad():
        _, slow = attention(q, k, v, pattern=pattern, return_weights=True)
    assert torch.equal(slow.indptr, wt.indptr) and torch.equal(slow.indices, wt.indices), kind
    _close(wt.values, slow.values.double(), atol, f"{kind} weights vs PyTorch")


@child_only
@fuzz
@given(data=st.data(), b=st.integers(1, 2), hkv=st.integers(1, 2), g=st.integers(1, 2),
       lq=st.integers(1, 40), d=st.integers(1, 9), w=st.integers(1, 6), dil=st.integers(1, 4),
       kind=st.sampled_from(["dilated", "exponential", "window|dilated"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), n=threads, limit=team_limits)
def test_offsets(data, b, hkv, g, lq, d, w, dil, kind, dtype, n, limit):
    """Offset patterns (dilated, exponential) and their union with a band (the fused kernel for
    the band part, merged through the log-sum-exps)."""
    _ensure_all()
    q, q64 = data.draw(views((b, hkv * g, lq, d), dtype))
    k, k64 = data.draw(views((b, hkv, lq, d), dtype))
    v, v64 = data.draw(views((b, hkv, lq, 3), dtype))
    pattern = {"dilated": P.dilated(w, dil), "exponential": P.exponential(dil + 1),
               "window|dilated": P.sliding_window(w) | P.dilated(w, dil + 1)}[kind]
    ref = dense_reference(q64, k64, v64, pattern.to_dense(lq, lq))[0]
    atol = 1e-4 if dtype == torch.float32 else 1e-10
    with thread_team(n, limit):
        out = attention(q, k, v, pattern=pattern)
    _close(out, ref, atol, f"{kind} vs fp64")
    with natives_off():
        _close(out, attention(q, k, v, pattern=pattern).double(), atol, f"{kind} vs PyTorch")


@child_only
@fuzz
@given(data=st.data(), n1=st.integers(1, 3), n2=st.integers(2, 4), hkv=st.integers(1, 2),
       g=st.integers(1, 2), lq=st.integers(1, 12), lk=st.integers(1, 12), d=st.integers(1, 12),
       dv=st.integers(1, 12), dtype=st.sampled_from([torch.float32, torch.float64]),
       grad=st.booleans(), n=threads, limit=team_limits)
def test_short(data, n1, n2, hkv, g, lq, lk, d, dv, dtype, grad, n, limit):
    """Many short sequences with two batch dims, forward and (sometimes) backward."""
    _ensure_all()
    batch = (n1, n2)
    q, q64 = data.draw(views((*batch, hkv * g, lq, d), dtype))
    k, k64 = data.draw(views((*batch, hkv, lk, d), dtype))
    v, v64 = data.draw(views((*batch, hkv, lk, dv), dtype))
    dout = torch.randn(*batch, hkv * g, lq, dv, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (q64, k64, v64)] if grad else [q64, k64, v64]
    flat = [t.reshape(-1, *t.shape[2:]) for t in leaves]
    ref = dense_reference(*flat)[0].reshape(*batch, hkv * g, lq, dv)
    atol = 1e-4 if dtype == torch.float32 else 1e-10
    ins = [t.requires_grad_() if grad else t for t in (q.detach(), k.detach(), v.detach())]
    with thread_team(max(1, min(n, n1 * n2)), limit), spy("short_forward") as calls:
        out = attention(*ins)
        if grad:
            got = torch.autograd.grad(out, ins, dout)
    assert calls, "the short-sequence kernel was not used"
    _close(out, ref.detach(), atol, "short vs fp64")
    if grad:
        want = torch.autograd.grad(ref, leaves, dout.double())
        for name, a, b_ in zip("qkv", got, want):
            _close(a, b_, 10 * atol, f"d{name} vs fp64")
    with natives_off(), torch.no_grad():
        _close(out.detach(), attention(q, k, v).double(), atol, "short vs PyTorch")


@child_only
@fuzz
@given(data=st.data(), b=st.integers(1, 3), hkv=st.integers(1, 2), g=st.integers(1, 4),
       lq=st.integers(1, 2), lk=st.integers(512, 700), d=st.sampled_from([5, 8, 16]),
       dv=st.sampled_from([7, 32]), n=threads, limit=team_limits)
def test_decode(data, b, hkv, g, lq, lk, d, dv, n, limit):
    """Split-K decoding over caches as views (slices of longer buffers, expanded heads, the
    issue's multi-query transposes)."""
    _ensure_all()
    q, q64 = data.draw(views((b, hkv * g, lq, d)))
    k, k64 = data.draw(views((b, hkv, lk, d)))
    v, v64 = data.draw(views((b, hkv, lk, dv)))
    ref = dense_reference(q64, k64, v64)[0]
    with thread_team(n, limit), spy("decode_forward") as calls, torch.no_grad():
        out = attention(q, k, v)
    assert calls, "the decoding kernel was not used"
    _close(out, ref, 1e-4, "decode vs fp64")
    with natives_off(), torch.no_grad():
        _close(out, attention(q, k, v).double(), 1e-4, "decode vs PyTorch")


@child_only
@fuzz
@given(data=st.data(), rows=st.integers(1, 4), in_f=st.sampled_from([128, 131]),
       outs=st.lists(st.sampled_from([128, 5, 130]), min_size=1, max_size=3),
       bias=st.booleans(), gelu=st.booleans(), residual=st.booleans(), norm=st.booleans(),
       rope=st.booleans(), n=threads, limit=team_limits)
def test_gemv(data, rows, in_f, outs, bias, gelu, residual, norm, rope, n, limit):
    """split_linear and gemv_multi with every vector/table/residual as a view."""
    _ensure_all()
    x, x64 = data.draw(views((1, rows, in_f)))
    ws = [torch.randn(o, in_f) for o in outs]
    bs = [data.draw(views((o,)))[0] if bias else None for o in outs]
    total = sum(outs)
    kw = {"gelu": gelu}
    if residual:
        kw["residual"] = data.draw(views((1, rows, total)))[0]
    if norm:
        kw["layer_norm"] = (data.draw(views((in_f,)))[0], data.draw(views((in_f,)))[0], 1e-5)
    if rope and outs[0] % 4 == 0:
        kw["rope"] = (data.draw(views((rows, 4)))[0], data.draw(views((rows, 4)))[0], outs[0])
    ref = native.gemv_reference(x64, ws, bs, **kw).view(1, rows, total)
    atol = 1e-3 * (1 + float(ref.abs().max()) / 100)
    with thread_team(n, limit), torch.no_grad():
        _close(native.gemv_multi(x, ws, bs, **kw), ref, atol, "gemv_multi vs fp64")
        with spy("gemv_multi") as calls:
            y = split_linear(x, ws[0], bs[0], gelu=gelu)
        assert calls or ws[0].numel() < 16384, "split_linear did not use the native GEMV"
        one = native.gemv_reference(x64, ws[:1], bs[:1], gelu=gelu).view(1, rows, outs[0])
        _close(y, one, atol, "split_linear vs fp64")
    with natives_off(), torch.no_grad():
        _close(y, split_linear(x, ws[0], bs[0], gelu=gelu).double(), atol,
               "split_linear vs PyTorch")


# ------------------------------------------------------------------------------ parent tests


def _run(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.skipif(CHILD, reason="the parent's test")
def test_fuzz_in_a_subprocess():
    """The fuzz tests above, in a child process: a segfault fails this test."""
    env = {**os.environ, "ATTNKIT_FUZZ_CHILD": "1", "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(Path(__file__)), "-k", "not subprocess and not shrunken"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, (f"child pytest exited with {res.returncode} (a negative code is "
                                 f"a signal: -11 = SIGSEGV)\n{res.stdout[-6000:]}\n"
                                 f"{res.stderr[-3000:]}")


THREADS_SCRIPT = textwrap.dedent("""
    import ctypes, threading, torch
    from attnkit import attention, dense_reference, patterns as P
    from attnkit.kernels import native
    from attnkit.nn.attention import split_linear

    assert all(s["available"] for s in native.kernel_status().values())
    g = torch.Generator().manual_seed(0)
    cases = []
    q, k, v = (torch.randn(2, 4, 300, 16, generator=g) for _ in range(3))
    pat = P.sliding_window(5)
    cases.append(("band", lambda: attention(q, k, v, pattern=pat),
                  dense_reference(q.double(), k.double(), v.double(),
                                  pat.to_dense(300, 300))[0]))
    qd = torch.randn(3, 8, 1, 64, generator=g)
    kd = torch.randn(1, 3, 1024, 64, generator=g).transpose(0, 1)
    cases.append(("decode", lambda: attention(qd, kd, kd),
                  dense_reference(qd.double(), kd.double(), kd.double())[0]))
    qs = torch.randn(64, 2, 16, 8, generator=g)
    cases.append(("short", lambda: attention(qs, qs, qs),
                  dense_reference(qs.double(), qs.double(), qs.double())[0]))
    x, w, b = torch.randn(2, 512, generator=g), torch.randn(1000, 512, generator=g), \\
        torch.randn(2000, generator=g)[::2]
    cases.append(("gemv", lambda: split_linear(x, w, b),
                  torch.nn.functional.linear(x.double(), w.double(), b.double())))

    def check(tag):
        with torch.no_grad():
            for name, fn, ref in cases:
                err = (fn().double() - ref).abs().max().item()
                assert err < 1e-3, (tag, name, err)

    omp = ctypes.CDLL(native._openmp_library())
    check("plain")
    torch.set_num_threads(8)           # more threads than cores, then let OpenMP shrink teams
    omp.omp_set_dynamic(1)
    check("dynamic, 8 threads")
    omp.omp_set_dynamic(0)
    torch.set_num_threads(3)
    check("3 threads")
    native.set_team_limit(1)            # the team asked for is 3; one thread starts
    check("forced team of 1")
    native.set_team_limit(0)
    torch.set_num_threads(1)
    check("1 thread")
    torch.set_num_threads(2)
    errors = []                         # kernels called from several Python threads at once

    def worker():
        try:
            for _ in range(3):
                check("concurrent")
        except Exception as e:
            errors.append(e)

    ts = [threading.Thread(target=worker) for _ in range(3)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors, errors
    print("ok")
""")


def test_thread_teams_that_shrink_or_change_in_a_subprocess():
    """omp_set_dynamic(1) with more threads than cores, a forced team of one, thread counts
    changing between calls, and concurrent callers: every kernel writes every output."""
    res = _run(THREADS_SCRIPT)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), \
        f"rc={res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


def test_one_thread_and_a_shrunken_team_from_the_environment():
    """OMP_NUM_THREADS=1 and ATTNKIT_TEST_SHRINK_TEAM=1 (read when the kernels load)."""
    code = ("import torch; from attnkit.kernels import native; "
            "print(native._team_limit[0], torch.get_num_threads())\n" + THREADS_SCRIPT)
    res = _run(code, {"OMP_NUM_THREADS": "1", "ATTNKIT_TEST_SHRINK_TEAM": "1"})
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stderr[-3000:]}"
    assert res.stdout.split()[:2] == ["1", "1"] and res.stdout.strip().endswith("ok")
