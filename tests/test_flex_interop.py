"""FlexAttention interop: ``patterns.from_mask_mod`` and ``Pattern.to_block_mask``."""

from __future__ import annotations

import pytest
import torch

from attnkit import attention, dense_reference
from attnkit import patterns as P

flex = pytest.importorskip("torch.nn.attention.flex_attention")
create_block_mask = flex.create_block_mask
create_mask = flex.create_mask

F64 = torch.float64


def _qkv(lq=70, lk=70, hq=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, hq, lq, d, generator=g, dtype=F64),
            torch.randn(2, hkv, lk, d, generator=g, dtype=F64),
            torch.randn(2, hkv, lk, d, generator=g, dtype=F64))


def _same_blocks(a, b) -> None:
    """Two BlockMasks describe the same blocks (partial and full) and the same elements."""
    assert a.shape == b.shape
    assert a.BLOCK_SIZE == b.BLOCK_SIZE
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.to_dense(), b.to_dense())
    lq, lk = a.shape[-2:]
    ma = create_mask(a.mask_mod, None, None, lq, lk)
    mb = create_mask(b.mask_mod, None, None, lq, lk)
    assert torch.equal(ma, mb)


def _elements(bm, lq: int, lk: int) -> torch.Tensor:
    """The (Lq, Lk) mask a BlockMask stands for: its mask_mod inside partial blocks, True in
    full blocks, False elsewhere (what flex_attention computes over)."""
    blocks = bm.to_dense()[0, 0].bool()  # partial or full blocks
    full = torch.zeros_like(blocks)
    if bm.full_kv_num_blocks is not None:
        fb = bm.full_kv_num_blocks[0, 0]
        fi = bm.full_kv_indices[0, 0]
        for r in range(blocks.shape[0]):
            full[r, fi[r, : int(fb[r])]] = True
    bq, bk = bm.BLOCK_SIZE
    up = lambda t: t.repeat_interleave(bq, 0).repeat_interleave(bk, 1)[:lq, :lk]  # noqa: E731
    mm = create_mask(bm.mask_mod, None, None, lq, lk)[0, 0]
    return (up(blocks & ~full) & mm) | up(full)


def local_mod(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 5


def causal_mod(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def stripes_mod(b, h, q_idx, kv_idx):
    return ((q_idx + kv_idx) % 3 == 0) | (kv_idx == 0)


@pytest.mark.parametrize("mod", [local_mod, causal_mod, stripes_mod])
@pytest.mark.parametrize("lq,lk", [(70, 70), (33, 90)])
def test_from_mask_mod_matches_create_block_mask(mod, lq, lk):
    p = P.from_mask_mod(mod)
    ref = create_block_mask(mod, None, None, lq, lk, BLOCK_SIZE=16)
    _same_blocks(p.to_block_mask(lq, lk, block_size=16), ref)
    want = create_mask(mod, None, None, lq, lk)[0, 0]
    assert torch.equal(p.to_dense(lq, lk), want)


@pytest.mark.parametrize("mod", [local_mod, causal_mod, stripes_mod])
def test_from_mask_mod_attention_equals_dense_reference(mod):
    q, k, v = _qkv(lq=45, lk=70)
    p = P.from_mask_mod(mod)
    mask = create_mask(mod, None, None, 45, 70)[0, 0]
    ref, ref_w = dense_reference(q, k, v, mask)
    out, w = attention(q, k, v, pattern=p, return_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(w.to_dense(), ref_w, atol=1e-12, rtol=0)


def test_from_mask_mod_composes_sparsely():
    """Intersected with a band, only the band's candidates are scored (the predicate cuts
    them): exact, and the plan's cost is the band's, not Lq * Lk."""
    q, k, v = _qkv(lq=80, lk=80)
    p = P.sliding_window(6) & P.from_mask_mod(stripes_mod)
    assert p.cost(80, 80) <= 80 * 13
    mask = P.sliding_window(6).to_dense(80, 80) & create_mask(stripes_mod, None, None, 80, 80)[0, 0]
    assert torch.equal(p.to_dense(80, 80), mask)
    ref, _ = dense_reference(q, k, v, mask)
    torch.testing.assert_close(attention(q, k, v, pattern=p), ref, atol=1e-12, rtol=0)
    u = P.sliding_window(2) | P.from_mask_mod(stripes_mod)
    ref, _ = dense_reference(q, k, v, u.to_dense(80, 80))
    torch.testing.assert_close(attention(q, k, v, pattern=u), ref, atol=1e-12, rtol=0)


def test_from_mask_mod_batch_and_head():
    """b and h are fixed per pattern: one pattern per (batch, head) for mods that read them."""

    def mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= b + 2 * h

    assert torch.equal(P.from_mask_mod(mod, batch=1, head=2).to_dense(20, 20),
                       P.sliding_window(5).to_dense(20, 20))
    assert torch.equal(P.from_mask_mod(mod).to_dense(20, 20), P.sliding_window(0).to_dense(20, 20))


def test_from_mask_mod_bad_input():
    with pytest.raises(TypeError, match="mask_mod must be callable"):
        P.from_mask_mod(3)
    with pytest.raises(ValueError, match="batch"):
        P.from_mask_mod(local_mod, batch=-1)
    with pytest.raises(TypeError, match="bool tensor"):
        P.from_mask_mod(lambda b, h, q, kv: (q - kv).float()).to_dense(4, 4)


PATTERNS = [
    (P.causal(), lambda lq, lk: lambda b, h, q, kv: kv <= q + (lk - lq)),
    (P.sliding_window(7), lambda lq, lk: lambda b, h, q, kv: (kv - q - (lk - lq)).abs() <= 7),
    (P.sliding_window(4) & P.causal(),
     lambda lq, lk: lambda b, h, q, kv: (kv <= q + lk - lq) & (kv >= q + lk - lq - 4)),
    (P.global_tokens([0, 9]), lambda lq, lk: lambda b, h, q, kv: (
        (q + lk - lq == 0) | (q + lk - lq == 9) | (kv == 0) | (kv == 9))),
    (P.block_diagonal([30, 40]), lambda lq, lk: lambda b, h, q, kv: (q >= 30) == (kv >= 30)),
]


@pytest.mark.parametrize("pattern,ref_mod", PATTERNS, ids=lambda x: repr(x)[:30])
def test_to_block_mask_matches_create_block_mask(pattern, ref_mod):
    lq = lk = 70
    bm = pattern.to_block_mask(lq, lk, block_size=16)
    ref = create_block_mask(ref_mod(lq, lk), None, None, lq, lk, BLOCK_SIZE=16)
    _same_blocks(bm, ref)
    assert torch.equal(_elements(bm, lq, lk), pattern.to_dense(lq, lk))


@pytest.mark.parametrize("pattern", [
    P.exponential(), P.random_keys(5, seed=3), P.dilated(3, 4) | P.global_tokens([2]),
    P.graph(torch.tensor([[0, 1, 2, 5], [1, 2, 0, 40]]), 50),
], ids=repr)
def test_to_block_mask_any_pattern(pattern):
    """Patterns read through their allowed pairs (isin / seeded draws): same elements."""
    bm = pattern.to_block_mask(50, 50, block_size=16)
    assert torch.equal(_elements(bm, 50, 50), pattern.to_dense(50, 50))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_to_block_mask_flex_attention_equals_engine():
    q, k, v = (t.float() for t in _qkv(lq=96, lk=96))
    p = P.sliding_window(9) & P.causal() | P.global_tokens([0, 50])
    out = flex.flex_attention(q, k, v, block_mask=p.to_block_mask(96, 96, block_size=32),
                              enable_gqa=True)
    torch.testing.assert_close(out, attention(q, k, v, pattern=p), atol=1e-5, rtol=1e-5)


def test_to_block_mask_bad_sizes():
    with pytest.raises(ValueError, match="Lq"):
        P.causal().to_block_mask(-1, 4)
    with pytest.raises(ValueError, match="global_tokens"):
        P.global_tokens([10]).to_block_mask(5, 5)
