"""Issue 17, items 5 and 6: bounded cost from small inputs and clear errors for nonsense.

Each case of the issue's "Why" in this scope is a regression test with its exact error type or
result. Loader cases (FASTA, Planetoid, food webs, NIfTI) live beside the loaders' own tests.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pytest
import torch

import attnkit
from attnkit import generate
from attnkit import patterns as P
from attnkit.argtypes import (
    existing_dir,
    existing_file,
    existing_path,
    new_or_existing_dir,
    nonnegative_int,
    one_of,
    positive_int,
)
from attnkit.cache import DynamicCache, StaticCache
from attnkit.functional import dense_reference
from attnkit.genome.markov import MarkovModel
from attnkit.knapsack import AttentionKnapsack
from attnkit.models import DecoderLM
from attnkit.nn.attention import RotaryEmbedding, SelfAttention
from attnkit.nn.axial import AxialAttention
from attnkit.nn.cross import CrossAttention
from attnkit.nn.graph import GraphAttention, check_edge_index

HUGE = [10**6, 10**9, 2**62, 2**70]


def _qkv(b=1, h=2, lq=8, lk=8, d=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g, dtype=dtype),
            torch.randn(b, h, lk, d, generator=g, dtype=dtype),
            torch.randn(b, h, lk, d, generator=g, dtype=dtype))


def _check_exact(pattern, lq, lk):
    """pairs() equals the predicate, and attention equals the dense masked reference."""
    mask = pattern.to_dense(lq, lk)
    rows, cols = pattern.pairs(lq, lk)
    dense_pairs = mask.nonzero()
    assert torch.equal(rows, dense_pairs[:, 0]) and torch.equal(cols, dense_pairs[:, 1])
    assert pattern.nnz(lq, lk) == int(mask.sum())
    q, k, v = _qkv(lq=lq, lk=lk)
    out = attnkit.attention(q, k, v, pattern=pattern)
    ref, _ = dense_reference(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------- windows, dilations


@pytest.mark.parametrize("w", HUGE)
def test_huge_window_on_8_tokens_is_small_and_exact(w):
    p = P.sliding_window(w)
    t0 = time.perf_counter()
    plan = p.plan(8, 8)
    assert p.cost(8, 8) == 8 * 15  # offsets -7..7, not 2w + 1
    assert len(plan) == 1 and (plan[0].lo, plan[0].hi) == (-7, 7)
    _check_exact(p, 8, 8)
    assert time.perf_counter() - t0 < 30  # was ~2 s and +1.8 GB at 10**6, 128 GB at 10**9
    assert p.to_dense(8, 8).all()


@pytest.mark.parametrize("lq, lk", [(8, 8), (3, 11), (11, 3), (1, 9), (0, 5), (5, 0)])
@pytest.mark.parametrize("w", [0, 2, 10**9])
def test_window_clamp_exact_for_any_shape(w, lq, lk):
    p = P.sliding_window(w)
    mask = p.to_dense(lq, lk)
    rows, cols = p.pairs(lq, lk)
    assert torch.equal(torch.stack([rows, cols], 1), mask.nonzero())
    if lq and lk:
        _check_exact(p, lq, lk)


@pytest.mark.parametrize("w, d", [(10**9, 3), (2, 10**9), (2**62, 2**62), (2**70, 5), (3, 2)])
def test_huge_dilations_are_small_and_exact(w, d):
    p = P.dilated(w, d)
    assert p.cost(8, 8) <= 8 * 15
    _check_exact(p, 8, 8)
    _check_exact(p, 3, 10)


@pytest.mark.parametrize("make", [
    lambda: P.sliding_window(10**9) & P.causal(),
    lambda: P.sliding_window(2**62) | P.exponential(),
    lambda: P.dilated(10**9, 2) | P.global_tokens([1]),
    lambda: P.exponential(base=2**62) | P.sliding_window(1),
])
def test_huge_compositions_exact(make):
    _check_exact(make(), 9, 9)


# ----------------------------------------------------------------------------- random keys


def test_random_keys_999_of_1000_is_fast_and_distinct():
    p = P.random_keys(999)
    t0 = time.perf_counter()
    indptr, cols = p.csr(1000, 1000)
    assert time.perf_counter() - t0 < 30  # was 40 s (re-drawing duplicates)
    cols = cols.view(1000, 999)
    assert torch.equal(indptr, torch.arange(1001) * 999)
    assert (cols[:, 1:] > cols[:, :-1]).all()  # sorted, hence distinct
    assert cols.min() >= 0 and cols.max() < 1000


@pytest.mark.parametrize("r, lk", [(1, 1), (3, 10), (5, 10), (6, 10), (40, 100), (60, 100),
                                   (10, 3)])
def test_random_keys_distinct_sorted_deterministic(r, lk):
    lq = 50
    _, cols = P.random_keys(r, seed=3).csr(lq, lk)
    m = min(r, lk)
    cols = cols.view(lq, m)
    assert (cols[:, 1:] > cols[:, :-1]).all() and cols.min() >= 0 and cols.max() < lk
    assert torch.equal(cols.reshape(-1), P.random_keys(r, seed=3).csr(lq, lk)[1])
    if m < lk:
        assert not torch.equal(cols.reshape(-1), P.random_keys(r, seed=4).csr(lq, lk)[1])


@pytest.mark.parametrize("r, lk", [(3, 10), (7, 10), (40, 60)])
def test_random_keys_uniform(r, lk):
    """Each key is chosen with probability r / lk (chi-square over keys, fixed seed)."""
    lq = 4000
    _, cols = P.random_keys(r, seed=0).csr(lq, lk)
    counts = torch.bincount(cols, minlength=lk).double()
    expected = lq * r / lk
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < lk + 6 * math.sqrt(2 * lk)  # far inside the tail for lk - 1 dof


def test_random_keys_attention_exact():
    _check_exact(P.random_keys(5, seed=2), 12, 12)


# ------------------------------------------------------------------------- degenerate sizes


def test_head_dim_zero_is_value_error():
    q, k, v = _qkv(d=4)
    with pytest.raises(ValueError, match="head dims must be >= 1, got D=0"):
        attnkit.attention(q[..., :0], k[..., :0], v)  # was ZeroDivisionError
    with pytest.raises(ValueError, match="Dv=0"):
        attnkit.attention(q, k, v[..., :0], pattern=P.sliding_window(1))


@pytest.mark.parametrize("hq, hkv", [(0, 2), (0, 0), (2, 0)])
def test_no_heads_is_value_error(hq, hkv):
    q = torch.randn(1, hq, 5, 4)
    k = v = torch.randn(1, hkv, 5, 4)
    with pytest.raises(ValueError, match="at least one head"):
        attnkit.attention(q, k, v)


@pytest.mark.parametrize("kw", [
    {}, {"pattern": P.causal()}, {"pattern": P.sliding_window(1)},
    {"pattern": P.random_keys(2)}, {"return_weights": True},
    {"pattern": P.sliding_window(2), "return_weights": True},
    {"temperature": torch.tensor([1.0, 2.0])},
])
@pytest.mark.parametrize("qshape, lk", [((0, 2, 5, 4), 5), ((0, 2, 1, 4), 600),
                                        ((3, 0, 2, 5, 4), 5), ((0, 2, 40, 40), 40)])
def test_empty_batch_gives_empty_result(kw, qshape, lk):
    q = torch.randn(*qshape, requires_grad=True)
    k = torch.randn(*qshape[:-2], lk, qshape[-1], requires_grad=True)
    res = attnkit.attention(q, k, k, **kw)  # the decode-sized call was ZeroDivisionError
    out = res[0] if isinstance(res, tuple) else res
    assert out.shape == q.shape and out.dtype == q.dtype
    if isinstance(res, tuple):
        w = res[1]
        n = w.values.shape[-1] if isinstance(w, attnkit.SparseWeights) else lk
        assert (w.values if isinstance(w, attnkit.SparseWeights) else w).shape[-1] == n
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    with torch.no_grad():
        assert attnkit.attention(q, k, k, **kw) is not None


# ------------------------------------------------------------------------------ temperature


@pytest.mark.parametrize("temp, err", [
    (torch.tensor([float("inf"), 1.0]), ValueError),  # was accepted (a float inf is not)
    (torch.tensor([float("nan"), 1.0]), ValueError),
    (torch.tensor([0.0, 1.0]), ValueError),
    (torch.tensor([-1.0, 1.0]), ValueError),
    (torch.tensor(float("inf")), ValueError),
    (torch.tensor([1 + 1j, 1.0]), TypeError),
    (torch.tensor([True, True]), TypeError),
    (float("inf"), ValueError),
    (0.0, ValueError),
    ("1", TypeError),
])
def test_temperature_finite_positive(temp, err):
    q, k, v = _qkv()
    with pytest.raises(err, match="temperature"):
        attnkit.attention(q, k, v, temperature=temp)
    if isinstance(temp, torch.Tensor) and temp.numel() == 2:
        with pytest.raises(err, match="temperature"):
            GraphAttention(4, 4, heads=2, temperature=temp)


def test_good_tensor_temperature_still_works():
    q, k, v = _qkv()
    t = torch.tensor([0.5, 2.0], dtype=torch.float64)
    out = attnkit.attention(q, k, v, temperature=t)
    ref, _ = dense_reference(q, k, v, temperature=t)
    torch.testing.assert_close(out, ref)


# ---------------------------------------------------------------------------- index tensors


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.float32,
                                   torch.float64, torch.bool])
def test_edge_index_must_be_integer(dtype):
    ei = torch.tensor([[0, 1], [1, 0]]).to(dtype)
    with pytest.raises(TypeError, match="edge_index"):
        P.graph(ei, 2)  # complex was accepted
    with pytest.raises(TypeError, match="edge_index"):
        check_edge_index(ei, 2)


def test_other_index_tensors_must_be_integer():
    with pytest.raises(TypeError, match="global_tokens indices"):
        P.global_tokens(torch.tensor([1 + 0j]))
    with pytest.raises(TypeError, match="global_tokens indices"):
        P.global_tokens([1.0])
    with pytest.raises(TypeError, match="block_diagonal lengths"):
        P.block_diagonal([1.5, 2.0])
    with pytest.raises(ValueError, match="int64"):
        P.global_tokens([2**70])
    with pytest.raises(ValueError, match="num_nodes"):
        P.graph(torch.tensor([[0], [1]]), 2**40)
    with pytest.raises(ValueError, match="seed"):
        P.random_keys(2, seed=2**64)
    P.graph(torch.tensor([[0], [1]], dtype=torch.int32), 2)  # any integer dtype is fine


# ---------------------------------------------------------------------- constructor arguments


@pytest.mark.parametrize("kw", [
    {"num_candidates": 0}, {"num_candidates": 2.5}, {"num_candidates": True},
    {"bisection_steps": 0}, {"bisection_steps": "3"},
    {"spread": float("nan")}, {"spread": float("inf")}, {"spread": -0.1}, {"spread": "x"},
])
def test_knapsack_constructor_checks(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        AttentionKnapsack(**kw)


def test_knapsack_fit_arguments_checked_first():
    inst = [(np.array([1.0, 2.0]), np.array([1.0, 3.0]), 2.0)]
    with pytest.raises(ValueError, match="steps"):
        AttentionKnapsack().fit(inst, steps=-1)
    with pytest.raises(ValueError, match="lr"):
        AttentionKnapsack().fit(inst, lr=float("nan"))


def test_module_constructor_checks():
    with pytest.raises(ValueError, match="dropout"):
        SelfAttention(8, 2, dropout=float("nan"))
    with pytest.raises(ValueError, match="layer_idx"):
        SelfAttention(8, 2, layer_idx=-1)
    with pytest.raises(ValueError, match="base"):
        RotaryEmbedding(8, base=float("inf"))
    with pytest.raises(ValueError, match="head_dim"):
        CrossAttention(8, 8, 2, head_dim=2.5)
    with pytest.raises(ValueError, match="num_heads"):
        CrossAttention(8, 8, True)
    with pytest.raises(ValueError, match="max_context_len"):
        CrossAttention(8, 8, 2, max_context_len=0)
    with pytest.raises(ValueError, match="negative_slope"):
        GraphAttention(4, 4, score="additive", negative_slope=float("nan"))
    with pytest.raises(ValueError, match="chunk_size"):
        AxialAttention(8, 2, chunk_size=True)
    with pytest.raises(ValueError, match="dropout"):
        AxialAttention(8, 2, dropout="0.1")
    with pytest.raises(ValueError, match="alpha"):
        MarkovModel(2, alpha=float("inf"))


# ------------------------------------------------------------------------------ cache reuse


def _lm() -> DecoderLM:
    torch.manual_seed(0)
    m = DecoderLM(11, 16, 1, 2, max_seq_len=32)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("make", [DynamicCache, lambda: StaticCache(32)])
def test_reused_cache_refused_until_reset(make):
    model = _lm()
    prompt = torch.tensor([1, 2, 3])
    cache = make()
    first = generate(model, prompt, 4, temperature=0, cache=cache)
    with pytest.raises(ValueError, match=r"reset\(\)"):
        generate(model, torch.tensor([4, 5]), 4, temperature=0, cache=cache)  # was appended
    cache.reset()
    again = generate(model, torch.tensor([4, 5]), 4, temperature=0, cache=cache)
    fresh = generate(model, torch.tensor([4, 5]), 4, temperature=0, use_cache=False)
    assert torch.equal(again, fresh)
    cache.reset()
    assert torch.equal(generate(model, prompt, 4, temperature=0, cache=cache), first)


# --------------------------------------------------------------------------- argument types


def test_argtypes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x")
    assert positive_int("3") == 3 and nonnegative_int("0") == 0
    for bad in ("-5", "0", "abc", "1.5", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
            positive_int(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        nonnegative_int("-1")
    assert existing_file(str(f)) == str(f)
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory"):
        existing_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="no such file"):
        existing_file(str(tmp_path / "missing"))
    assert existing_dir(str(tmp_path)) == str(tmp_path)
    with pytest.raises(argparse.ArgumentTypeError, match="not a directory"):
        existing_dir(str(f))
    assert existing_path(str(f)) == str(f)
    with pytest.raises(argparse.ArgumentTypeError, match="no such file or directory"):
        existing_path(str(tmp_path / "missing"))
    assert new_or_existing_dir(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
    with pytest.raises(argparse.ArgumentTypeError, match="not a directory"):
        new_or_existing_dir(str(f))
    with pytest.raises(argparse.ArgumentTypeError, match="not a directory"):
        new_or_existing_dir(str(f / "sub"))
    pick = one_of("cora", "pubmed", lower=True)
    assert pick("CORA") == "cora"
    with pytest.raises(argparse.ArgumentTypeError, match="one of cora, pubmed"):
        pick("foo")


@pytest.mark.parametrize("name, argv, fragment", [
    ("knapsack", ["--instances", "-5"], "positive integer"),  # was KeyError deep in the run
    ("genome", ["--fasta", "."], "is a directory"),  # failed only after ~50 s of work
    ("genome", ["--fasta", "/no/such.fa"], "no such file"),
    ("foodweb", ["--foodweb", "/no/such.paj"], "no such file or directory"),
    ("foodweb", ["--diet", "meat"], "one of links, flow"),
    ("planetoid", ["--data-dir", "/no/such/dir"], "no such directory"),
    ("planetoid", ["--data-dir", ".", "--dataset", "imagenet"], "one of cora"),
])
def test_experiment_options_refused_at_parsing(name, argv, fragment, capsys):
    from attnkit.experiments import registry

    exp = registry()[name]
    parser = argparse.ArgumentParser(prog=f"attnkit run {name}", exit_on_error=True)
    for opt in exp.options:
        if opt.type is not bool:
            parser.add_argument(opt.flag, dest=opt.dest, type=opt.type, default=opt.default)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    assert e.value.code == 2
    assert fragment in capsys.readouterr().err
