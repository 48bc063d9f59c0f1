"""The native decoding kernels (attnkit.kernels.native): split-K decoding attention behind
``attnkit.attention`` and the GEMV behind ``split_linear``, against fp64 references. Each test
checks the native path was really taken (a C compiler exists wherever these run)."""

from __future__ import annotations

import copy
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import passed_with_isa_flags, thread_team
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit.functional as functional
from attnkit import attention, dense_reference, generate
from attnkit import patterns as P
from attnkit.cache import DynamicCache, StaticCache
from attnkit.kernels import native
from attnkit.models import DecoderLM, GeluMLP
from attnkit.nn.attention import split_linear

HAS_CC = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
pytestmark = [
    pytest.mark.skipif(not HAS_CC, reason="no C compiler: the native kernels are optional"),
    pytest.mark.skipif(native._native_disabled(), reason="ATTNKIT_NATIVE=0: kernels turned off"),
]


def _spy(monkeypatch, name):
    assert native.band_available() and native.gemv_available()
    seen = []
    real = getattr(native, name)

    def spy(*a, **kw):
        seen.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(native, name, spy)
    return seen


def _qkv(b, hq, hkv, lq, lk, d, dv, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, lq, d, generator=g) * scale,
            torch.randn(b, hkv, lk, d, generator=g) * scale,
            torch.randn(b, hkv, lk, dv, generator=g))


@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,dv", [
    (1, 12, 1, 1, 2048, 64, 64),   # multi-query step
    (2, 8, 2, 1, 700, 32, 16),     # grouped-query, batch 2, keys not a multiple of the chunk
    (1, 6, 6, 1, 513, 16, 16),     # multi-head: one row per head
    (1, 4, 1, 3, 600, 8, 8),       # three new positions, all keys visible (no pattern)
    (1, 3, 1, 1, 1027, 64, 32),    # register-blocked path: odd rows, keys not a multiple of 4
    (2, 10, 2, 1, 515, 24, 96),    # register-blocked path, batch 2, a chunk of 257 keys
])
def test_decoding_kernel_matches_dense_reference(monkeypatch, b, hq, hkv, lq, lk, d, dv):
    seen = _spy(monkeypatch, "decode_forward")
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dv)
    with torch.no_grad():
        out = attention(q, k, v)
    ref = dense_reference(q.double(), k.double(), v.double())[0]
    assert seen, "the decoding kernel was not used"
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_single_causal_query_sees_every_key(monkeypatch):
    seen = _spy(monkeypatch, "decode_forward")
    q, k, v = _qkv(1, 4, 2, 1, 800, 16, 16, seed=1)
    with torch.no_grad():
        out = attention(q, k, v, pattern=P.causal())
    assert seen
    ref = dense_reference(q.double(), k.double(), v.double(), P.causal().to_dense(1, 800))[0]
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d,dv", [(16, 8), (64, 32)])  # sgemm and register-blocked products
def test_cache_views_and_extreme_logits(monkeypatch, d, dv):
    """Keys/values as views into a longer preallocated buffer (a static cache), logits ~1e4."""
    seen = _spy(monkeypatch, "decode_forward")
    q, kb, vb = _qkv(2, 6, 3, 1, 1100, d, dv, seed=2, scale=25.0 * (16 / d) ** 0.5)
    k, v = kb[:, :, :900], vb[:, :, :900]
    with torch.no_grad():
        out = attention(q, k, v, scale=1.0)
    assert seen and torch.isfinite(out).all()
    ref = dense_reference(q.double(), k.double(), v.double(), scale=1.0)[0]
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)



# (rows per key/value head, keys, d, dv): the AVX-512 kernels take d % 16 == 0 and dv % 32 == 0
# (scores: transposed key tiles of 32 keys from five rows on, rows in blocks of at most 12,
# fewer rows in dot-product blocks of 4 x 4, 2 x 8, 1 x 16 keys; values: blocks of at most 6
# rows, 64 or 32 channels at a time); the rest, and narrower builds
# (test_rows_on_narrower_instruction_sets), the AVX2 or sgemm paths.
ROW_GEOMETRIES = [
    (12, 2048, 64, 64),   # multi-query step: one block of 12 rows, 2 blocks of 6 for values
    (1, 1500, 64, 64),    # multi-head: one row, blocks of 16 keys and a tail
    (1, 700, 128, 64),    # one row, 128 channels (key by key, the query in 8 registers)
    (2, 1000, 64, 64),    # two rows: blocks of 2 x 8
    (4, 300, 32, 32),     # four rows: blocks of 4 x 4, 300 keys (150 per thread) and a tail
    (3, 777, 128, 128),   # odd rows, keys not a multiple of 32 or 64
    (5, 513, 64, 32),     # five rows: first with transposed tiles, 32 channels
    (7, 300, 128, 96),    # blocks of 4 + 3 rows, channels 64 + 32, 300 = 9 x 32 + 12
    (13, 1025, 64, 64),   # 13 rows: blocks of 7 + 6 (scores), 5 + 4 + 4 (values)
    (8, 37, 16, 32),      # one partial tile
    (6, 600, 24, 96),     # d off 16: AVX2 scores, wide values
]


def _row_reference(q, k, v, scale):
    s = scale * q.double() @ k.double().transpose(-1, -2)
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v.double(), lse


@pytest.mark.parametrize("rows, lk, d, dv", ROW_GEOMETRIES)
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_match_fp64(rows, lk, d, dv, threads):
    """Output and log-sum-exp of decode_forward for several rows per head (split-K over one or
    two threads) against fp64, batch 2 with two key/value heads."""
    assert native.decode_available()
    q, k, v = _qkv(2, 2 * rows, 2, 1, lk, d, dv, seed=rows + lk)
    q = q.view(2, 2, rows, d)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = native.decode_forward(q, k, v, d ** -0.5)
    finally:
        torch.set_num_threads(old)
    ref, ref_lse = _row_reference(q, k, v, d ** -0.5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows, d, dv", [(12, 64, 64), (5, 128, 32), (2, 64, 64), (1, 64, 64),
                                         (3, 8, 8)])
def test_rows_with_masked_keys_and_extreme_logits(rows, d, dv):
    """Keys whose first channel is -inf (every row's score -inf; q's first channel is 1): some
    keys, a whole key chunk, or all keys (out 0, lse -inf), and logits ~1e4 elsewhere."""
    assert native.decode_available()
    lk = 1100
    q, k, v = _qkv(1, 2 * rows, 2, 1, lk, d, dv, seed=rows, scale=25.0 * (16 / d) ** 0.5)
    q = q.view(1, 2, rows, d)
    q[..., 0] = 1.0
    k[0, 0, 3::7, 0] = -float("inf")   # head 0: every seventh key
    k[0, 0, :600, 0] = -float("inf")   # ... and the first chunks (split-K) entirely
    k[0, 1, :, 0] = -float("inf")      # head 1: no key at all
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, lse = native.decode_forward(q, k, v, 1.0)
    finally:
        torch.set_num_threads(old)
    ref, ref_lse = _row_reference(q, k, v, 1.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse[0, 0]).all()
    assert (out[0, 1] == 0).all() and torch.isneginf(lse[0, 1]).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse[0, 0].double(), ref_lse[0, 0], atol=1e-4, rtol=1e-6)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA flags")
@pytest.mark.parametrize("flags", [["-mno-avx512f"], ["-mno-avx512f", "-mno-avx2", "-mno-fma"]])
def test_rows_on_narrower_instruction_sets(flags):
    """The row tests with the library built for AVX2 only and for neither AVX2 nor FMA (the
    sgemm path): a machine without AVX-512 compiles these (-march=native there)."""
    tests = ["test_rows_match_fp64", "test_rows_with_masked_keys_and_extreme_logits",
             "test_decoding_kernel_matches_dense_reference"]
    assert passed_with_isa_flags(flags, __file__, tests) > 2 * len(ROW_GEOMETRIES)

def test_other_calls_keep_sdpa(monkeypatch):
    seen = _spy(monkeypatch, "decode_forward")
    q, k, v = _qkv(1, 4, 1, 1, 1024, 16, 16)
    attention(q.requires_grad_(), k, v).sum().backward()  # autograd: SDPA
    with torch.no_grad():
        attention(q, k, v, bias=torch.zeros(1024))  # bias: SDPA
        attention(q, k[:, :, :100], v[:, :, :100])  # short cache: SDPA
        attention(q.double(), k.double(), v.double())  # fp64: SDPA
        q_long, _, _ = _qkv(1, 4, 1, 8, 1024, 16, 16)
        attention(q_long, k, v)  # 4 * 8 = 32 rows per key/value head: SDPA
    assert not seen
    assert functional.DECODE_MAX_ROWS < 32


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), out_f=st.integers(1, 300), in_f=st.integers(1, 200),
       bias=st.booleans(), gelu=st.booleans())
def test_gemv_matches_linear(rows, out_f, in_f, bias, gelu):
    assert native.gemv_available()
    g = torch.Generator().manual_seed(rows * 1000 + out_f)
    x, w = torch.randn(rows, in_f, generator=g), torch.randn(out_f, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    if gelu:
        ref = F.gelu(ref)
    out = native.gemv_rows(x, w, b, gelu=gelu)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("threads,limit", [(4, 1), (4, 2), (3, 0), (2, 0)])
def test_gemv_every_row_once_when_threads_take_over_others_blocks(threads, limit):
    """The GEMV team cuts the rows into one block per thread asked for; a thread that is done
    takes grains from the back of another's block (team_run_steal). With fewer threads than
    blocks (the team limit), the ones that start do every block: each row written once, as
    F.linear's."""
    g = torch.Generator().manual_seed(threads * 10 + limit)
    x, w = torch.randn(2, 96, generator=g), torch.randn(1001, 96, generator=g)
    b = torch.randn(1001, generator=g)
    ref = F.linear(x.double(), w.double(), b.double())
    with thread_team(threads, limit):
        for _ in range(3):
            out = native.gemv_rows(x, w, b)
            torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_split_linear_uses_gemv_only_without_autograd(monkeypatch):
    seen = _spy(monkeypatch, "gemv_multi")
    lin = torch.nn.Linear(256, 300)
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        y = split_linear(x, lin.weight, lin.bias, gelu=True)
    assert len(seen) == 1 and y.shape == (1, 1, 300)
    torch.testing.assert_close(y, F.gelu(lin(x)), atol=1e-5, rtol=1e-5)
    y = split_linear(x, lin.weight, lin.bias)  # weights need gradients: the differentiable path
    y.sum().backward()
    assert len(seen) == 1 and lin.weight.grad is not None


def test_gelu_mlp_equals_the_plain_sequential():
    torch.manual_seed(0)
    mlp = GeluMLP(64, 256)
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        plain = mlp[2](F.gelu(mlp[0](x)))
        torch.testing.assert_close(mlp(x), plain, atol=1e-5, rtol=1e-5)
    assert set(mlp.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize("path", ["model", "block", "gemv"])
@pytest.mark.parametrize("cache_cls,kv_heads,batch", [
    (StaticCache, 1, 1), (StaticCache, 2, 2), (DynamicCache, 4, 3)])
def test_decoding_step_with_native_kernels_equals_full_forward(monkeypatch, path, cache_cls,
                                                                kv_heads, batch):
    """Cached steps (every block and the output layer in one native call; each block in one
    call; or native GEMV + the decoding kernel) give the logits of the full uncached forward
    pass, for several steps in a row (the cache's positions advance), MQA, GQA and MHA, one or
    several sequences."""
    from attnkit.lm import model as lm_model

    if path != "model":
        monkeypatch.setattr(lm_model, "_decode_model", lambda *a: None)
    if path == "gemv":
        monkeypatch.setattr(native, "step_available", lambda: False)
    seen = _spy(monkeypatch, "decode_forward")
    calls: dict[str, list] = {"block": [], "model": []}
    for name, cls in (("block", native.PreparedDecodeBlock),
                      ("model", native.PreparedDecodeModel)):
        def spy_call(self, *a, _real=cls.__call__, _seen=calls[name], **kw):
            _seen.append(a[0].shape)
            return _real(self, *a, **kw)

        monkeypatch.setattr(cls, "__call__", spy_call)
    torch.manual_seed(0)
    model = DecoderLM(64, 128, 2, 4, kv_heads, max_seq_len=700).eval()
    for p in model.parameters():  # non-trivial norms and biases
        torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 64, (batch, 600))
    with torch.no_grad():
        cache = cache_cls(700) if cache_cls is StaticCache else cache_cls()
        model(ids[:, :-3], cache=cache)
        for t in (3, 2, 1):
            step = model(ids[:, -t:ids.shape[1] - t + 1], cache=cache)[:, -1]
            full = model(ids[:, :ids.shape[1] - t + 1])[:, -1]
            torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
        assert cache.seq_length(0) == cache.seq_length(1) == 600
    # (the kernels' self-checks may run here too, on their own small blocks); a dynamic cache
    # is full after the prompt: its first step grows it through the module path
    fused = 3 if cache_cls is StaticCache else 2
    if path == "model":
        assert calls["model"].count((batch, 128)) == fused
        assert calls["block"].count((batch, 128)) == 0
    elif path == "block":
        assert calls["block"].count((batch, 128)) == fused * model.depth
        assert calls["model"].count((batch, 128)) == 0
    else:
        assert not calls["block"] and not calls["model"]
    assert bool(seen) == (fused < 3 or path == "gemv")


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), sizes=st.lists(st.integers(1, 70), min_size=1, max_size=3),
       in_f=st.integers(1, 90), bias=st.booleans(), gelu=st.booleans(), residual=st.booleans(),
       norm=st.sampled_from([None, "plain", "affine"]))
def test_gemv_multi_matches_torch(rows, sizes, in_f, bias, gelu, residual, norm):
    """Several weights in one call, with the LayerNorm before and the residual after fused in,
    against F.layer_norm / F.linear / torch.cat in fp64."""
    g = torch.Generator().manual_seed(rows * 7919 + in_f * 31 + sum(sizes))
    x = torch.randn(rows, in_f, generator=g) * 3 + 1
    ws = [torch.randn(o, in_f, generator=g) for o in sizes]
    bs = [torch.randn(o, generator=g) if bias and i != 1 else None for i, o in enumerate(sizes)]
    res = torch.randn(rows, sum(sizes), generator=g) if residual else None
    ln = None
    xd = x.double()
    if norm is not None:
        lw, lb = ((torch.randn(in_f, generator=g), torch.randn(in_f, generator=g))
                  if norm == "affine" else (None, None))
        ln = (lw, lb, 1e-5)
        xd = F.layer_norm(xd, (in_f,), None if lw is None else lw.double(),
                          None if lb is None else lb.double(), 1e-5)
    ref = torch.cat([F.linear(xd, w.double(), None if b is None else b.double())
                     for w, b in zip(ws, bs)], -1)
    if gelu:
        ref = F.gelu(ref)
    if res is not None:
        ref = ref + res.double()
    out = native.gemv_multi(x, ws, bs, gelu=gelu, residual=res, layer_norm=ln)
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)


def test_gemv_multi_rope_matches_rotary_embedding():
    """The rotary embedding applied in the GEMV pass equals RotaryEmbedding on the output."""
    from attnkit.nn.attention import RotaryEmbedding

    torch.manual_seed(0)
    hd, heads, length = 16, 3, 2
    rot = RotaryEmbedding(hd)
    x = torch.randn(1, length, 40)
    w_qk, w_v = torch.randn(heads * hd, 40), torch.randn(hd, 40)
    cos, sin = rot.cos_sin(5, 5 + length, x.device, x.dtype)
    out = native.gemv_multi(x, (w_qk, w_v), rope=(cos, sin, heads * hd))
    plain = F.linear(x, w_qk).view(1, length, heads, hd).transpose(1, 2)
    ref_qk = rot(plain, offset=5).transpose(1, 2).reshape(1, length, heads * hd)
    torch.testing.assert_close(out[..., :heads * hd], ref_qk, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[..., heads * hd:], F.linear(x, w_v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"weights": ()}, "weights"),
    ({"weights": (torch.randn(4, 7),)}, r"weights\[0\]"),
    ({"biases": (torch.randn(3),)}, r"biases\[0\]"),
    ({"residual": torch.randn(1, 5)}, "residual"),
    ({"layer_norm": (torch.randn(3), None, 1e-5)}, "layer_norm weight"),
    ({"rope": (torch.randn(1, 4), torch.randn(1, 4), 3)}, "rope cols"),
    ({"rope": (torch.randn(2, 4), torch.randn(2, 4), 4)}, "rope cos"),
])
def test_gemv_multi_bad_input(kwargs, match):
    args = {"x": torch.randn(1, 8), "weights": (torch.randn(4, 8),), "biases": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        native.gemv_multi(args.pop("x"), args.pop("weights"), args.pop("biases"), **args)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), sizes=st.lists(st.integers(1, 70), min_size=1, max_size=3),
       in_f=st.integers(1, 90), bias=st.booleans(), gelu=st.booleans(), residual=st.booleans(),
       norm=st.booleans(), strided_bias=st.booleans())
def test_prepared_gemv_equals_gemv_multi(rows, sizes, in_f, bias, gelu, residual, norm,
                                         strided_bias):
    """A prepared product gives gemv_multi's result for every call, with the addresses that
    change (x, out, residual) written per call; strided vectors are bound as copies."""
    g = torch.Generator().manual_seed(rows * 7 + in_f)
    ws = tuple(torch.randn(o, in_f, generator=g) for o in sizes)
    if bias:
        bs = tuple(torch.randn(2 * o, generator=g)[::2] if strided_bias
                   else torch.randn(o, generator=g) for o in sizes)
    else:
        bs = (None,) * len(sizes)
    ln = (torch.randn(in_f, generator=g), torch.randn(in_f, generator=g), 1e-5) if norm else None
    prepared = native.PreparedGemv(ws, bs, gelu=gelu, layer_norm=ln)
    for _ in range(2):  # a second call with other tensors: no address is left from the first
        x = torch.randn(rows, in_f, generator=g)
        res = torch.randn(rows, sum(sizes), generator=g) if residual else None
        out = prepared(x, torch.empty(rows, sum(sizes)), residual=res)
        ref = native.gemv_multi(x, ws, bs, gelu=gelu, residual=res, layer_norm=ln)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_prepared_gemv_rope_and_bad_input():
    torch.manual_seed(0)
    hd, heads = 16, 3
    x, w = torch.randn(2, 40), torch.randn(heads * hd, 40)
    from attnkit.nn.attention import RotaryEmbedding

    cos, sin = RotaryEmbedding(hd).cos_sin(7, 8, x.device, x.dtype)
    prepared = native.PreparedGemv((w,), rope_cols=heads * hd, rope_dim=hd)
    got = prepared(x, torch.empty(2, heads * hd), rope=(cos, sin))
    torch.testing.assert_close(got, native.gemv_multi(x.view(2, 1, 40), (w,),
                                                      rope=(cos, sin, heads * hd)).view(2, -1))
    with pytest.raises(ValueError, match="rope tables are needed"):
        prepared(x, torch.empty(2, heads * hd))
    with pytest.raises(ValueError, match="rope tables"):
        prepared(x, torch.empty(2, heads * hd), rope=(cos[:, :8], sin[:, :8]))
    with pytest.raises(ValueError, match="x must be"):
        prepared(torch.randn(2, 41), torch.empty(2, heads * hd), rope=(cos, sin))
    with pytest.raises(ValueError, match="x must be"):  # too many rows for a GEMV
        prepared(torch.randn(5, 40), torch.empty(5, heads * hd), rope=(cos, sin))
    with pytest.raises(ValueError, match="x must be"):  # out of the wrong size
        prepared(x, torch.empty(2, heads * hd - 1), rope=(cos, sin))
    with pytest.raises(ValueError, match="residual"):
        prepared(x, torch.empty(2, heads * hd), residual=torch.randn(2, 3), rope=(cos, sin))
    with pytest.raises(ValueError, match="rope cos"):
        native.PreparedGemv((w,), rope_cols=heads * hd, rope_dim=3)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        native.PreparedGemv((w, torch.randn(4, 39)))


def _block_operands(g, dim, h, hkv, hd, hidden, bias):
    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    def b(n):
        return rand(n) if bias else None

    return (rand(h * hd, dim), rand(hkv * hd, dim), rand(hkv * hd, dim), b(h * hd), b(hkv * hd),
            b(hkv * hd), 1 + rand(dim), b(dim), rand(dim, h * hd), b(dim), 1 + rand(dim), b(dim),
            rand(hidden, dim), b(hidden), rand(dim, hidden), b(dim), 1e-5, 1e-3)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 3]),
       hd=st.sampled_from([2, 6, 8, 64]), dim=st.integers(1, 40), hidden=st.integers(1, 50),
       pos=st.integers(0, 600), extra=st.integers(1, 5), bias=st.booleans(),
       rotary=st.booleans())
def test_prepared_decode_block_matches_reference(rows, hkv, group, hd, dim, hidden, pos, extra,
                                                 bias, rotary):
    """The whole-block step against its fp64 reference: GQA/MQA/MHA, one to four sequences,
    odd widths, head dims off the register-blocked sizes, positions from the first to past
    several key chunks; only row ``pos`` of the caches changes."""
    g = torch.Generator().manual_seed(rows * 1000 + pos)
    h = hkv * group
    operands = _block_operands(g, dim, h, hkv, hd, hidden, bias)
    rope = None
    if rotary:
        angles = torch.randn(1, hd // 2, generator=g) * 5
        rope = (torch.cat([angles, angles], -1).cos(),
                torch.cat([-angles.sin(), angles.sin()], -1))
    x = torch.randn(rows, dim, generator=g)
    kc = torch.randn(rows, hkv, pos + extra, hd, generator=g)
    vc = torch.randn(rows, hkv, pos + extra, hd, generator=g)
    ref, ref_k, ref_v = native.decode_block_reference(x, operands, kc, vc, pos, h, rope)
    block = native.PreparedDecodeBlock(operands, num_heads=h, num_kv_heads=hkv, rotary=rotary)
    out = block(x, torch.empty_like(x), kc, vc, pos, rope)
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(kc.double(), ref_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vc.double(), ref_v, atol=1e-5, rtol=1e-5)


def test_prepared_decode_block_bad_input():
    g = torch.Generator().manual_seed(0)
    operands = _block_operands(g, 16, 4, 2, 8, 24, True)
    block = native.PreparedDecodeBlock(operands, num_heads=4, num_kv_heads=2, rotary=True)
    x, kc, vc = torch.randn(2, 16), torch.zeros(2, 2, 10, 8), torch.zeros(2, 2, 10, 8)
    rope = (torch.ones(1, 8), torch.zeros(1, 8))
    with pytest.raises(ValueError, match="pos must be"):
        block(x, torch.empty_like(x), kc, vc, 10, rope)
    with pytest.raises(ValueError, match="pos must be"):
        block(x, torch.empty_like(x), kc, vc, -1, rope)
    with pytest.raises(ValueError, match="out must not be x"):
        block(x, x, kc, vc, 3, rope)
    with pytest.raises(ValueError, match="k_cache"):
        block(x, torch.empty_like(x), kc[:1], vc, 3, rope)
    with pytest.raises(ValueError, match="v_cache"):
        block(x, torch.empty_like(x), kc, vc.transpose(2, 3).contiguous().transpose(2, 3), 3,
              rope)
    with pytest.raises(ValueError, match="rope"):
        block(x, torch.empty_like(x), kc, vc, 3)
    with pytest.raises(ValueError, match="x must be"):
        block(torch.randn(2, 15), torch.empty(2, 16), kc, vc, 3, rope)
    with pytest.raises(ValueError, match="num_heads"):
        native.PreparedDecodeBlock(operands, num_heads=3, num_kv_heads=2, rotary=True)
    with pytest.raises(ValueError, match="operands"):
        native.PreparedDecodeBlock(operands[:5], num_heads=4, num_kv_heads=2, rotary=True)
    with pytest.raises(ValueError, match="weights"):
        bad = (operands[0][:, :15], *operands[1:])
        native.PreparedDecodeBlock(bad, num_heads=4, num_kv_heads=2, rotary=True)
    assert torch.equal(kc, torch.zeros_like(kc))  # nothing written by a refused call


def test_decoding_step_sees_replaced_and_updated_weights():
    """The prepared decoding step follows the model: a parameter updated in place and one
    whose .data is replaced both change the next step's logits as the module path does; a
    model that has decoded still deep-copies and pickles."""
    import copy
    import io

    torch.manual_seed(0)
    model = DecoderLM(64, 64, 2, 4, 1, max_seq_len=64).eval()
    ids = torch.randint(0, 64, (1, 12))

    def step_and_full():
        with torch.no_grad():
            cache = StaticCache(20)
            model(ids[:, :-1], cache=cache)
            return model(ids[:, -1:], cache=cache)[:, -1], model(ids)[:, -1]

    step, full = step_and_full()
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
    fc1 = model.blocks[1].mlp[0]
    with torch.no_grad():
        fc1.weight.mul_(3.0)  # in place: same memory
    step2, full2 = step_and_full()
    torch.testing.assert_close(step2, full2, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(step2, step)
    fc1.weight.data = torch.randn_like(fc1.weight)  # new memory: the step must rebind
    model.blocks[0].norm1.eps = 1e-2
    step3, full3 = step_and_full()
    torch.testing.assert_close(step3, full3, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(step3, step2)
    clone = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    with torch.no_grad():
        torch.testing.assert_close(clone(ids), model(ids))


def test_decoder_block_native_step_equals_module_path():
    """The fused decoding step of a block (norms, projections, rotary, residuals in native
    GEMV calls) gives what the modules compute one by one; hooks, autograd and swapped layers
    take the module path."""
    from attnkit.models import DecoderBlock

    torch.manual_seed(0)
    block = DecoderBlock(96, 6, 2, P.causal(), 4.0, 0.0, 0).eval()
    for p in block.parameters():  # non-trivial norms and biases
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 1, 96)
    past = torch.randn(1, 20, 96)
    with torch.no_grad():
        outs = []
        for use_hook in (False, True):
            cache = StaticCache(40)
            block.attn(block.norm1(past), cache=cache)  # fill the cache through the modules
            handle = block.mlp.register_forward_hook(lambda *a: None) if use_hook else None
            assert block._decode_ready(x) is not use_hook
            outs.append(block(x, cache))
            assert cache.seq_length(0) == 21
            if handle is not None:
                handle.remove()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert not block._decode_ready(x)  # grad mode is on outside no_grad
    with torch.no_grad():
        assert block._decode_ready(x)
        assert not block._decode_ready(torch.randn(1, 5, 96))  # more rows than a GEMV takes
        assert not block._decode_ready(x.double())
        block.train()
        assert not block._decode_ready(x)
        block.eval()
        block.mlp[1] = torch.nn.ReLU()
        assert not block._decode_ready(x)


@pytest.mark.parametrize("batch,new", [(1, 3), (2, 2), (4, 1)])
def test_fused_multi_row_steps_equal_module_path(batch, new):
    """Steps of several rows (batch x new positions <= 4) through the fused block path give the
    logits of the module path (taken here by enabling autograd), with rotary positions per
    row and a causal mask among the new positions."""
    torch.manual_seed(1)
    model = DecoderLM(50, 64, 2, 4, 2, max_seq_len=64).eval()
    ids = torch.randint(0, 50, (batch, 20 + new))
    results = []
    for fused in (True, False):
        cache = StaticCache(64)
        with torch.set_grad_enabled(not fused):
            model(ids[:, :20], cache=cache)
            assert model.blocks[0]._decode_ready(torch.zeros(batch, new, 64)) is fused
            results.append(model(ids[:, 20:], cache=cache).detach())
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        full = model(ids)[:, 20:]
    torch.testing.assert_close(results[0], full, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------- regressions from issue 17

ISSUE_CASES = """
import json, torch, attnkit
from attnkit import dense_reference
from attnkit.nn.attention import split_linear
torch.manual_seed(0)
B, L, D = 2, 1024, 64
q = torch.randn(B, 4, 1, D)
res = {}
def err(out, ref):
    return (out.double() - ref).abs().amax((1, 2, 3)).tolist()
with torch.no_grad():
    k = torch.randn(1, B, L, D).transpose(0, 1); v = torch.randn(1, B, L, D).transpose(0, 1)
    ref = dense_reference(q.double(), k.double(), v.double())[0]
    res["mqa transposed"] = err(attnkit.attention(q, k, v), ref)
    x = torch.randn(B, L, D); k = v = x.view(B, L, 1, D).transpose(1, 2)
    ref = dense_reference(q.double(), k.double(), v.double())[0]
    res["size-1 head view"] = err(attnkit.attention(q, k, v), ref)
    x, w = torch.randn(1, 256), torch.randn(256, 256)
    for name, b in (("strided bias", torch.randn(512)[::2]),
                    ("expanded bias", torch.randn(1).expand(256))):
        ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
        res[name] = [(split_linear(x, w, b).double() - ref).abs().max().item()]
print(json.dumps(res))
"""


def test_issue_layouts_in_a_subprocess():
    """The issue's cases: multi-query k/v as ``randn(1, B, L, D).transpose(0, 1)`` through the
    split-K kernel (was SIGSEGV), ``x.view(B, L, 1, D).transpose(1, 2)`` (batch 1 was off by
    0.22), and split_linear with a strided or stride-0 bias (off by 3.6 / read past storage)."""
    import json

    res = subprocess.run([sys.executable, "-c", ISSUE_CASES], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"exit {res.returncode} (-11: SIGSEGV)\n{res.stderr[-3000:]}"
    errors = json.loads(res.stdout)
    assert set(errors) == {"mqa transposed", "size-1 head view", "strided bias", "expanded bias"}
    for name, errs in errors.items():
        assert max(errs) < 1e-4, (name, errs)


def test_decode_forward_validates_its_inputs():
    assert native.decode_available()
    q, k, v = _qkv(2, 2, 2, 1, 600, 8, 8)
    with pytest.raises(ValueError, match="k must be"):
        native.decode_forward(q, k[:1], v)
    with pytest.raises(ValueError, match="k must be"):
        native.decode_forward(q, k, v[:, :, :5])
    with pytest.raises(TypeError, match="q must be torch.float32"):
        native.decode_forward(q.double(), k, v)
    with pytest.raises(ValueError, match="q must have 4 dims"):
        native.decode_forward(q[0], k, v)
    with pytest.raises(ValueError, match="scale must be finite"):
        native.decode_forward(q, k, v, float("inf"))
    out, lse = native.decode_forward(q[:0], k[:0], v[:0])  # no batch: the empty result
    assert out.shape == (0, 2, 1, 8) and lse.shape == (0, 2, 1)


def test_gemv_reads_strided_vectors_and_tables():
    """Every vector gemv_multi takes (biases, LayerNorm weight/bias, residual, rotary tables)
    as a strided or expanded view gives what its contiguous copy gives."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 64, generator=g), torch.randn(96, 64, generator=g)
    b = torch.randn(192, generator=g)[::2]
    ln = (torch.randn(1, generator=g).expand(64), torch.randn(128, generator=g)[1::2], 1e-5)
    res = torch.randn(96, 2, generator=g).T
    cos, sin = torch.randn(2, 8, 2, generator=g).transpose(1, 2)
    kw = {"residual": res, "layer_norm": ln, "rope": (cos, sin, 64)}
    got = native.gemv_multi(x, (w,), (b,), **kw)
    contiguous = {"residual": res.contiguous(),
                  "layer_norm": (ln[0].contiguous(), ln[1].contiguous(), 1e-5),
                  "rope": (cos.contiguous(), sin.contiguous(), 64)}
    torch.testing.assert_close(got, native.gemv_multi(x, (w,), (b.contiguous(),), **contiguous),
                               rtol=0, atol=0)
    ref = native.gemv_reference(x, (w,), (b,), **kw)
    assert (got.double() - ref).abs().max() < 1e-4


def test_pool_kernels_work_in_a_forked_child():
    """The decoding kernels run on team.h's own thread pool; a forked child (a DataLoader
    worker) has none of its helper threads and must still compute every item."""
    import multiprocessing as mp

    assert native.decode_available() and native.gemv_available()
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 700, 16, generator=g), \
        torch.randn(1, 2, 700, 32, generator=g)
    x, w = torch.randn(1, 64, generator=g), torch.randn(300, 64, generator=g)
    with torch.no_grad():
        want = native.decode_forward(q, k, v)[0], native.gemv_rows(x, w)  # the pool starts here
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as p:
        got = p.apply(_pool_child, (q, k, v, x, w))
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def _pool_child(q, k, v, x, w):
    torch.set_num_threads(2)
    with torch.no_grad():
        return native.decode_forward(q, k, v)[0], native.gemv_rows(x, w)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 4), heads=st.lists(st.tuples(st.integers(1, 3), st.sampled_from(
           [1, 2, 3])), min_size=1, max_size=3), hd=st.sampled_from([2, 8, 64]),
       dim=st.integers(1, 40), hidden=st.integers(1, 50), pos=st.integers(0, 400),
       bias=st.booleans(), rotary=st.booleans(), logits=st.booleans())
def test_prepared_decode_model_matches_chained_blocks(rows, heads, hd, dim, hidden, pos, bias,
                                                      rotary, logits):
    """Every block of a decoder in one native call (blocks of different head counts, as after
    pruning), then the final LayerNorm and the output layer, against the fp64 block reference
    chained block by block and F.layer_norm / F.linear; each block writes row ``pos`` of its
    own caches only."""
    g = torch.Generator().manual_seed(rows * 1000 + pos + 7 * len(heads))
    blocks, operands, caches, ropes = [], [], [], []
    for hkv, group in heads:
        ops = _block_operands(g, dim, hkv * group, hkv, hd, hidden, bias)
        operands.append((ops, hkv * group))
        blocks.append(native.PreparedDecodeBlock(ops, num_heads=hkv * group, num_kv_heads=hkv,
                                                 rotary=rotary))
        cap = pos + 1 + int(torch.randint(0, 4, (1,), generator=g))
        caches.append((torch.randn(rows, hkv, cap, hd, generator=g),
                       torch.randn(rows, hkv, cap, hd, generator=g), pos))
        rope = None
        if rotary:
            angles = torch.randn(1, hd // 2, generator=g) * 5
            rope = (torch.cat([angles, angles], -1).cos(),
                    torch.cat([-angles.sin(), angles.sin()], -1))
        ropes.append(rope)
    vocab = 11
    head_w, head_b = torch.randn(vocab, dim, generator=g), torch.randn(vocab, generator=g)
    norm_w = 1 + 0.3 * torch.randn(dim, generator=g)
    x = torch.randn(rows, dim, generator=g)
    ref, ref_caches = x.double(), []
    for (ops, h), (kc, vc, p), rope in zip(operands, caches, ropes):
        ref, ref_k, ref_v = native.decode_block_reference(ref, ops, kc, vc, p, h, rope)
        ref_caches.append((ref_k, ref_v))
    if logits:
        model = native.PreparedDecodeModel(blocks, norm=(norm_w, None, 1e-5),
                                           head=(head_w, head_b if bias else None))
        out_logits = torch.empty(rows, vocab)
    else:
        model, out_logits = native.PreparedDecodeModel(blocks), None
    out = model(x, torch.empty_like(x), caches, ropes, out_logits)
    tol = 2e-4 * len(heads)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for (kc, vc, _), (ref_k, ref_v) in zip(caches, ref_caches):
        torch.testing.assert_close(kc.double(), ref_k, atol=tol, rtol=tol)
        torch.testing.assert_close(vc.double(), ref_v, atol=tol, rtol=tol)
    if logits:
        ref_logits = F.linear(F.layer_norm(out.double(), (dim,), norm_w.double(), None, 1e-5),
                              head_w.double(), head_b.double() if bias else None)
        torch.testing.assert_close(out_logits.double(), ref_logits, atol=1e-4, rtol=1e-4)


def test_prepared_decode_model_bad_input():
    g = torch.Generator().manual_seed(0)
    blocks = [native.PreparedDecodeBlock(_block_operands(g, 16, 4, 2, 8, 24, True), num_heads=4,
                                         num_kv_heads=2, rotary=False) for _ in range(2)]
    norm, head = (None, None, 1e-5), (torch.randn(9, 16), None)
    model = native.PreparedDecodeModel(blocks, norm=norm, head=head)
    x = torch.randn(2, 16)
    caches = [(torch.zeros(2, 2, 10, 8), torch.zeros(2, 2, 10, 8), 3) for _ in range(2)]
    with pytest.raises(ValueError, match="one entry per block"):
        model(x, torch.empty_like(x), caches[:1], [None], torch.empty(2, 9))
    with pytest.raises(ValueError, match="logits must be"):
        model(x, torch.empty_like(x), caches, [None, None], torch.empty(2, 8))
    with pytest.raises(ValueError, match="logits must be"):
        model(x, torch.empty_like(x), caches, [None, None])
    with pytest.raises(ValueError, match="pos must be"):
        model(x, torch.empty_like(x), [caches[0], (*caches[1][:2], 10)], [None, None],
              torch.empty(2, 9))
    with pytest.raises(ValueError, match="out must not be x"):
        model(x, x, caches, [None, None], torch.empty(2, 9))
    with pytest.raises(ValueError, match="logits need"):
        native.PreparedDecodeModel(blocks)(x, torch.empty_like(x), caches, [None, None],
                                           torch.empty(2, 9))
    with pytest.raises(ValueError, match="norm and head"):
        native.PreparedDecodeModel(blocks, norm=norm)
    with pytest.raises(ValueError, match="width"):
        other = native.PreparedDecodeBlock(_block_operands(g, 12, 4, 2, 8, 24, True),
                                           num_heads=4, num_kv_heads=2, rotary=False)
        native.PreparedDecodeModel([blocks[0], other])
    with pytest.raises(TypeError, match="PreparedDecodeBlock"):
        native.PreparedDecodeModel([])
    with pytest.raises(ValueError, match="weights"):
        native.PreparedDecodeModel(blocks, norm=norm, head=(torch.randn(9, 15), None))
    # nothing written by a refused call
    assert all(torch.equal(kc, torch.zeros_like(kc)) for kc, _, _ in caches)


def test_model_step_falls_back_where_it_must(monkeypatch):
    """The one-call decoder step is taken for a model whose blocks differ in head count (after
    pruning) and gives the full forward's logits; a hook on a block sends the step through the
    blocks one by one (the hook runs); an output layer with a hook runs as a module after the
    native blocks. Logits agree on every path."""
    from attnkit.pruning import prune_heads

    calls = []
    real = native.PreparedDecodeModel.__call__

    def spy(self, *a, **kw):
        calls.append(a[4] if len(a) > 4 else kw.get("logits"))
        return real(self, *a, **kw)

    monkeypatch.setattr(native.PreparedDecodeModel, "__call__", spy)
    torch.manual_seed(0)
    model = prune_heads(DecoderLM(40, 64, 3, 4, 2, max_seq_len=64).eval(), {0: [0, 1], 2: [2, 3]})
    ids = torch.randint(0, 40, (2, 12))

    def step():
        with torch.no_grad():
            cache = StaticCache(20)
            model(ids[:, :-1], cache=cache)
            return model(ids[:, -1:], cache=cache)[:, -1]

    with torch.no_grad():
        full = model(ids)[:, -1]
    plain = step()
    torch.testing.assert_close(plain, full, atol=1e-4, rtol=1e-4)
    assert len(calls) == 1 and calls[0] is not None
    ran = []
    handle = model.blocks[1].register_forward_hook(lambda *a: ran.append(1))
    torch.testing.assert_close(step(), plain, atol=1e-5, rtol=1e-5)
    handle.remove()
    assert len(calls) == 1 and ran
    handle = model.head.register_forward_hook(lambda *a: ran.append(2))
    torch.testing.assert_close(step(), plain, atol=1e-5, rtol=1e-5)
    handle.remove()
    assert len(calls) == 2 and calls[1] is None and ran[-1] == 2


def test_back_with_huge_pages_changes_no_value_or_address(monkeypatch):
    """Huge pages are advice about physical memory only: values and addresses stay, the bytes
    advised are whole 2 MiB pages inside the tensors, strided and tiny tensors are skipped,
    and ATTNKIT_HUGE_PAGES=0 turns it off."""
    t = torch.randn(3 << 20)
    ref, ptr = t.clone(), t.data_ptr()
    done = native.back_with_huge_pages([t, torch.randn(5), torch.randn(1024, 1024).t()])
    assert t.data_ptr() == ptr and torch.equal(t, ref)
    assert 0 <= done <= t.numel() * 4 and done % (2 << 20) == 0
    monkeypatch.setenv("ATTNKIT_HUGE_PAGES", "0")
    assert native.back_with_huge_pages([t]) == 0


def test_huge_page_empty_gives_separate_exact_storages(monkeypatch):
    """huge_page_empty: tensors of the shapes and dtype asked for, one after another on 64-byte
    boundaries from a 2 MiB boundary, each with a storage of exactly its own bytes (so saving
    one saves only it) that outlives the others; writable, values kept; small requests, a
    failed mapping and ATTNKIT_HUGE_PAGES=0 give plain tensors."""
    import io
    import pickle

    monkeypatch.delenv("ATTNKIT_HUGE_PAGES", raising=False)
    shapes = [(1000, 700), (0, 3), (5,), (2, 3, 1024, 64)]
    ts = native.huge_page_empty(shapes, torch.float32)
    assert [tuple(t.shape) for t in ts] == shapes
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in ts)
    sized = [t for t in ts if t.numel()]
    if platform.system() == "Linux":
        assert sized[0].data_ptr() % (2 << 20) == 0
        assert all(b.data_ptr() - a.data_ptr() == -(-a.numel() * 4 // 64) * 64
                   for a, b in zip(sized, sized[1:]))
    for t in ts:
        assert t.untyped_storage().nbytes() == t.numel() * 4
    last = ts[-1]
    ref = torch.randn(last.shape)
    last.copy_(ref)
    del ts, sized
    [torch.ones(1 << 20) for _ in range(8)]  # reuse any memory freed too early
    assert torch.equal(last, ref)
    buf = io.BytesIO()
    torch.save(last, buf)
    assert len(buf.getvalue()) < last.numel() * 4 + 4096
    assert torch.equal(pickle.loads(pickle.dumps(last)), ref)
    small = native.huge_page_empty([(3, 4)], torch.float64)[0]
    assert small.dtype == torch.float64 and small.untyped_storage().nbytes() == 96
    # from 1 MiB (a multi-query layer's cache) on whole huge pages too
    mid = native.huge_page_empty([(300, 1024)])[0]
    if platform.system() == "Linux":
        assert mid.data_ptr() % (2 << 20) == 0
    mid.fill_(2.0)
    assert float(mid.sum()) == 2.0 * mid.numel()
    with monkeypatch.context() as m:  # no mapping to be had: plain tensors
        m.setattr(native.mmap, "mmap", lambda *a, **k: (_ for _ in ()).throw(OSError("none")))
        plain = native.huge_page_empty([(1 << 20,)])[0]
        assert plain.shape == (1 << 20,) and plain.untyped_storage().nbytes() == 4 << 20
    monkeypatch.setenv("ATTNKIT_HUGE_PAGES", "0")
    plain = native.huge_page_empty([(1 << 20,)])[0]
    assert plain.shape == (1 << 20,) and plain.untyped_storage().nbytes() == 4 << 20


def test_decoder_weights_and_cache_on_huge_page_memory_behave_as_plain_tensors(tmp_path,
                                                                               monkeypatch):
    """A DecoderLM's weights (and a buffer cache's keys/values) live in huge_page_empty memory:
    the tie between embedding and output layer holds, each parameter's storage is its own
    (safetensors accepts the state dict: no shared memory), a state dict round-trips, and the
    cached steps still equal the full forward."""
    monkeypatch.delenv("ATTNKIT_HUGE_PAGES", raising=False)
    torch.manual_seed(0)
    model = DecoderLM(300, 256, 2, 4, 4, max_seq_len=600).eval()
    assert model.head.weight is model.embed.weight
    for p in model.parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    if platform.system() == "Linux":
        assert model.embed.weight.data_ptr() % (2 << 20) == 0
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    other = DecoderLM(300, 256, 2, 4, 4, max_seq_len=600).eval()
    other.load_state_dict(torch.load(path))
    ids = torch.randint(0, 300, (1, 520))
    with torch.no_grad():
        full = model(ids)[:, -1]
        cache = StaticCache(600)
        other(ids[:, :-1], cache=cache)
        assert cache._keys[0].untyped_storage().nbytes() == cache._keys[0].numel() * 4
        step = other(ids[:, -1:], cache=cache)[:, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_model(model, str(tmp_path / "m.safetensors"))
    fresh = DecoderLM(300, 256, 2, 4, 4, max_seq_len=600)
    safetensors.load_model(fresh, str(tmp_path / "m.safetensors"))
    assert torch.equal(fresh.blocks[1].mlp[2].weight, model.blocks[1].mlp[2].weight)


def test_model_step_sees_every_change_after_binding(monkeypatch):
    """The one-call step checks at each step that nothing it was bound from changed: a swapped
    activation, a hook on an inner layer, a parameter replaced by a new one, a weight replaced
    by its transpose (same memory, no longer contiguous), new memory under the output layer's
    (tied) weight, a new LayerNorm eps, a block replaced, another block appended. After each
    change the cached step still gives the full forward's logits (and a hook runs)."""
    torch.manual_seed(0)
    model = DecoderLM(40, 64, 2, 4, 2, max_seq_len=64).eval()
    ids = torch.randint(0, 40, (1, 10))
    calls = []
    real = native.PreparedDecodeModel.__call__

    def check(expect_model_call: bool):
        with torch.no_grad():
            cache = StaticCache(20)
            model(ids[:, :-1], cache=cache)
            before = len(calls)
            step = model(ids[:, -1:], cache=cache)[:, -1]
            full = model(ids)[:, -1]
        torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
        assert (len(calls) > before) is expect_model_call

    def spy(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(native.PreparedDecodeModel, "__call__", spy)
    check(True)
    block = model.blocks[0]
    act = block.mlp[1]
    block.mlp[1] = torch.nn.ReLU()
    check(False)
    block.mlp[1] = act
    check(True)
    ran = []
    handle = block.attn.q_proj.register_forward_hook(lambda *a: ran.append(1))
    check(False)
    assert ran
    handle.remove()
    check(True)
    block.norm2.weight = torch.nn.Parameter(torch.randn(64))
    check(True)
    w = block.attn.out_proj.weight
    w.data = w.data.t()  # same memory, transposed: the step must not read it as before
    check(False)
    w.data = w.data.t().contiguous()
    check(True)
    model.head.weight.data = torch.randn_like(model.head.weight)  # new memory, tied embedding
    check(True)
    block.norm1.eps = 0.5
    check(True)
    model.blocks[1] = copy.deepcopy(model.blocks[0])
    model.blocks[1].attn.layer_idx = 1
    check(True)
    extra = copy.deepcopy(model.blocks[0])
    extra.attn.layer_idx = 2
    model.blocks.append(extra)
    model.depth = 3
    check(True)


def _generate_with_changes(monkeypatch, bound: bool, cache: str):
    """Greedy tokens of a small DecoderLM while on_token changes the model between tokens;
    ``bound=False`` turns generate's bound steps off (each step goes through the model).
    Returns the tokens and how many bound steps ran."""
    import attnkit.lm.decoding as decoding

    torch.manual_seed(0)
    model = DecoderLM(50, 64, 2, 4, 2, max_seq_len=128).eval()
    prompt = torch.randint(0, 50, (2, 30))
    gen = torch.Generator().manual_seed(1)
    changes = {
        3: lambda: model.blocks[0].mlp.__setitem__(1, torch.nn.ReLU()),
        6: lambda: model.blocks[0].mlp.__setitem__(1, torch.nn.GELU()),
        9: lambda: setattr(model.blocks[1].mlp[2].weight, "data",
                           torch.randn(64, 256, generator=gen) * 0.2),
        12: lambda: setattr(model, "embed", torch.nn.Embedding(50, 64)),
        15: lambda: model.blocks[1].register_forward_hook(lambda m, a, out: out * 0.5),
    }
    seen = [0]

    def on_token(_tok):
        seen[0] += 1
        if seen[0] in changes:
            changes[seen[0]]()

    ran = [0]
    real = native.BoundDecodeStep.__call__

    def spy(self, pos):
        ran[0] += 1
        return real(self, pos)

    with monkeypatch.context() as m:
        m.setattr(native.BoundDecodeStep, "__call__", spy)
        if not bound:
            m.setattr(decoding, "_native_decoding", lambda *a: None)
        tokens = generate(model, prompt, 20, temperature=0, cache=cache, on_token=on_token)
    return tokens, ran[0]


def test_generate_without_on_token_checks_once_and_holds_the_memory_it_reads(monkeypatch):
    """Without on_token, no other code runs between two bound steps of generate: the model's
    checks run at the first bound step only (and again after a step through the model: a
    dynamic cache that grows), with the tokens of steps through the model. A bound step holds
    the storages it reads, so a weight's memory replaced meanwhile (from another thread) is
    never freed under it."""
    if not native.step_available():
        pytest.skip("native decoder step not built here")
    import attnkit.lm.decoding as decoding
    from attnkit.lm import model as lm_model

    torch.manual_seed(0)
    model = DecoderLM(50, 64, 2, 4, 2, max_seq_len=128).eval()
    prompt = torch.randint(0, 50, (2, 30))
    checks, steps = [0], [0]
    real_unchanged, real_call = lm_model._Watch.unchanged, native.BoundDecodeStep.__call__
    with monkeypatch.context() as m:
        m.setattr(lm_model._Watch, "unchanged",
                  lambda self: checks.__setitem__(0, checks[0] + 1) or real_unchanged(self))
        m.setattr(native.BoundDecodeStep, "__call__",
                  lambda self, pos: steps.__setitem__(0, steps[0] + 1) or real_call(self, pos))
        for cache in ("static", "dynamic"):
            checks[0] = steps[0] = 0
            bound = generate(model, prompt, 20, temperature=0, cache=cache)
            assert steps[0] >= 15 and checks[0] <= 3 * (20 - steps[0]), (cache, steps, checks)
            with monkeypatch.context() as plain_path:
                plain_path.setattr(decoding, "_native_decoding", lambda *a: None)
                assert torch.equal(bound, generate(model, prompt, 20, temperature=0,
                                                   cache=cache))
    prepared = lm_model._PREPARED_MODELS[model]
    weight = model.blocks[1].mlp[2].weight
    ptr = weight.data_ptr()
    weight.data = torch.randn(64, 256)
    import gc

    gc.collect()
    block = prepared.call.blocks[1]
    assert ptr in [st.data_ptr() for st in block._storages]  # still allocated, held here


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_generate_bound_steps_see_changes_between_tokens(monkeypatch, cache):
    """generate runs a DecoderLM's cached steps bound (BoundDecodeStep: one native call, only
    the position written), and a change made between two tokens (from on_token: a swapped
    activation and back, new memory under a weight, a new embedding module, a hook on a block)
    is seen at the next step: the tokens equal those of steps through the model with the same
    changes. A dynamic cache grows on the way (the step through the model; bound again
    after)."""
    if not native.step_available():
        pytest.skip("native decoder step not built here")
    bound, ran = _generate_with_changes(monkeypatch, True, cache)
    plain, ran_plain = _generate_with_changes(monkeypatch, False, cache)
    assert ran_plain == 0 and 5 <= ran < 19
    assert torch.equal(bound, plain)


def _prepared_with_two_caches(seed: int, rows: int):
    """A small DecoderLM that ran an 8-token prompt and one cached step of ``rows`` sequences
    into each of two static caches (so they hold the same 9 positions): ``(model, ids (rows,
    12), caches, prepared model, rotary modules, rotary tables of 14 positions)``; skips where
    the native step is not built."""
    if not native.step_available():
        pytest.skip("native decoder step not built here")
    from attnkit.lm import model as lm_model

    torch.manual_seed(seed)
    model = DecoderLM(40, 64, 2, 4, 2, max_seq_len=64).eval()
    ids = torch.randint(0, 40, (rows, 12))
    caches = [StaticCache(16), StaticCache(16)]
    with torch.no_grad():
        for c in caches:
            model(ids[:, :8], cache=c)
            model(ids[:, 8:9], cache=c)
    rot = [b.attn.rotary for b in model.blocks]
    tables = [r.cos_sin(0, 14, torch.device("cpu"), torch.float32) for r in rot]
    return model, ids, caches, lm_model._PREPARED_MODELS[model], rot, tables


def test_bound_decode_step_equals_the_call_and_checks_position():
    """PreparedDecodeModel.bind + step(pos) gives the call's output and logits at every
    position and writes the same cache rows; a position past the caches or the rotary tables,
    and tables of the wrong width, are refused."""
    model, ids, (c0, c1), prepared, rot, tables = _prepared_with_two_caches(0, 2)
    x = torch.empty(2, 64)
    out, logits = torch.empty(2, 64), torch.empty(2, 40)
    step = prepared.call.bind(x, out, [(c0._keys[i], c0._values[i]) for i in range(2)], tables,
                              logits)
    assert step.limit == 14
    for pos in range(9, 12):
        x.copy_(model.embed.weight[ids[:, pos]])
        step(pos)
        ref_out, ref_logits = torch.empty(2, 64), torch.empty(2, 40)
        prepared.call(x.clone(), ref_out, [(c1._keys[i], c1._values[i], pos) for i in range(2)],
                      [r.cos_sin(pos, pos + 1, torch.device("cpu"), torch.float32) for r in rot],
                      ref_logits)
        assert torch.equal(out, ref_out) and torch.equal(logits, ref_logits)
        for i in range(2):
            assert torch.equal(c0._keys[i][:, :, pos], c1._keys[i][:, :, pos])
    for bad in (14, -1, 3.0, True):
        with pytest.raises(ValueError, match="pos must be"):
            step(bad)
    with pytest.raises(ValueError, match="rope rows"):
        prepared.call.bind(x, out, [(c0._keys[i], c0._values[i]) for i in range(2)],
                           [(t[0][:, :8], t[1][:, :8]) for t in tables], logits)


def test_bound_decode_step_embeds_ids_and_picks_greedy_tokens():
    """bind(ids=, embed=, next_ids=): the step copies the ids' embedding rows itself (the same
    output and logits as the caller writing them to x) and writes logits.argmax(-1), ties and
    NaN as torch breaks them; an id outside the embedding raises and changes nothing; bad
    buffers are refused."""
    model, ids, (c0, c1), prepared, _, tables = _prepared_with_two_caches(1, 3)
    pos0 = c0.seq_length(0)
    x, x_ref = torch.empty(3, 64), torch.empty(3, 64)
    out, ref_out = torch.empty(3, 64), torch.empty(3, 64)
    logits, ref_logits = torch.empty(3, 40), torch.empty(3, 40)
    tok, nxt = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    weight = model.embed.weight.detach()
    step = prepared.call.bind(x, out, [(c0._keys[i], c0._values[i]) for i in range(2)], tables,
                              logits, ids=tok, embed=weight, next_ids=nxt)
    ref = prepared.call.bind(x_ref, ref_out, [(c1._keys[i], c1._values[i]) for i in range(2)],
                             tables, ref_logits)
    for pos in range(pos0, pos0 + 3):
        tok.copy_(ids[:, pos])
        x_ref.copy_(weight[ids[:, pos]])
        step(pos)
        ref(pos)
        assert torch.equal(x, x_ref) and torch.equal(out, ref_out)
        assert torch.equal(logits, ref_logits)
        assert torch.equal(nxt, logits.argmax(-1))
    # ties, NaN, -inf: logits = the head's bias (zero weights), so the step's argmax meets
    # exactly these rows; it must be torch's
    for row in ([1.0, 3.0, 3.0, 0.0], [float("nan"), 2.0, float("nan"), 9.0],
                [0.0, 5.0, float("nan"), 9.0], [float("-inf")] * 4, [2.0, 7.0, -1.0, 7.0]):
        bias = torch.tensor(row)
        head = native.PreparedDecodeModel(prepared.call.blocks, norm=(None, None, 1e-5),
                                          head=(torch.zeros(4, 64), bias))
        lg, picked = torch.empty(3, 4), torch.full((3,), -7, dtype=torch.int64)
        bound = head.bind(x, out, [(c1._keys[i], c1._values[i]) for i in range(2)], tables,
                          lg, next_ids=picked)
        x.copy_(weight[ids[:, 0]])
        bound(pos0 + 3)
        torch.testing.assert_close(lg, bias.expand(3, 4), atol=0, rtol=0, equal_nan=True)
        assert torch.equal(picked, lg.argmax(-1)), (row, picked)
    keys_before = c0._keys[0][:, :, pos0 + 3].clone()
    tok.copy_(torch.tensor([0, 40, 1]))
    with pytest.raises(ValueError, match="token id"):
        step(pos0 + 3)
    assert torch.equal(c0._keys[0][:, :, pos0 + 3], keys_before)  # nothing written
    tok.copy_(torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="token id"):
        step(pos0 + 3)
    kv = [(c0._keys[i], c0._values[i]) for i in range(2)]
    with pytest.raises(ValueError, match="go together"):
        prepared.call.bind(x, out, kv, tables, logits, ids=tok)
    with pytest.raises(ValueError, match="ids must be"):
        prepared.call.bind(x, out, kv, tables, logits, ids=tok.int(), embed=weight)
    with pytest.raises(ValueError, match="next_ids must be"):
        prepared.call.bind(x, out, kv, tables, logits, next_ids=nxt[:2])
    with pytest.raises(ValueError, match="embed must be"):
        prepared.call.bind(x, out, kv, tables, logits, ids=tok, embed=weight[:, :32])
