"""Knapsack: exact solver vs brute force, Pisinger class definitions, the attention heuristic's
feasibility, and bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.knapsack import (
    CLASSES,
    AttentionKnapsack,
    generate,
    greedy_ratio,
    greedy_value,
    greedy_weight,
    solve_exact,
)


def _brute_force(w, v, c) -> int:
    best = 0
    for mask in itertools.product((0, 1), repeat=len(w)):
        m = np.array(mask, dtype=bool)
        if w[m].sum() <= c:
            best = max(best, int(v[m].sum()))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_exact_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    w = rng.integers(1, 30, size=n)
    v = rng.integers(0, 30, size=n)
    c = int(rng.integers(0, w.sum() + 2))
    value, items = solve_exact(w, v, c, method="dp")
    assert value == _brute_force(w, v, c)
    assert w[items].sum() <= c and v[items].sum() == value
    assert len(set(items.tolist())) == len(items)


@pytest.mark.parametrize("kind", CLASSES)
def test_pisinger_classes_follow_definitions(kind):
    R = 1000
    inst = generate(400, kind, R=R, seed=3)
    w, v = inst.weights, inst.values
    assert inst.capacity == int(0.5 * w.sum())
    assert (w >= 1).all() and (v >= 1).all()
    if kind == "inverse_strongly_correlated":
        assert (v <= R).all() and (w == v + R // 10).all()
    else:
        assert (w <= R).all() and w.min() < 50 and w.max() > R - 50  # spans [1, R]
    if kind == "uncorrelated":
        assert (v <= R).all() and abs(np.corrcoef(w, v)[0, 1]) < 0.2
    elif kind == "weakly_correlated":
        assert (np.abs(v - w) <= R // 10).all() | (v == 1).all()
        assert (v >= np.maximum(w - R // 10, 1)).all() and (v <= w + R // 10).all()
    elif kind == "strongly_correlated":
        assert (v == w + R // 10).all()
    elif kind == "almost_strongly_correlated":
        assert (np.abs(v - (w + R // 10)) <= R // 500).all()
    elif kind == "subset_sum":
        assert (v == w).all()
    assert (generate(400, kind, R=R, seed=3).weights == w).all()  # seeded


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), kind=st.sampled_from(CLASSES), seed=st.integers(0, 10_000),
       frac=st.floats(0.01, 0.99))
def test_attention_never_exceeds_capacity(n, kind, seed, frac):
    inst = generate(n, kind, R=100, seed=seed, capacity_fraction=frac)
    solver = AttentionKnapsack(num_candidates=3, bisection_steps=12)
    res = solver.solve_detailed(*inst)
    items = solver.solve(*inst)
    assert (items == res.items).all()
    assert inst.weights[items].sum() <= inst.capacity
    assert len(np.unique(items)) == len(items) and ((items >= 0) & (items < n)).all()
    assert res.weight_head.shape == res.value_head.shape == (n,)
    for heur in (greedy_ratio, greedy_value, greedy_weight):
        assert inst.weights[heur(*inst)].sum() <= inst.capacity


def test_heads_prefer_light_and_valuable_items():
    w = np.array([10, 20, 30, 40])
    v = np.array([5, 50, 15, 40])
    res = AttentionKnapsack().solve_detailed(w, v, 60)
    assert (np.diff(res.weight_head) < 0).all()  # lighter -> more attention
    assert np.argmax(res.value_head) == 1 and np.argmin(res.value_head) == 0
    # the product ranks by v/t2 - w/t1, i.e. v - lambda*w: exactly the log of the heads
    np.testing.assert_allclose(res.product, res.weight_head * res.value_head)


def test_attention_close_to_optimum_and_uses_engine(monkeypatch):
    import attnkit.knapsack.attention as mod

    calls = []
    real = mod.attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("temperature"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "attention", counting)
    gaps = []
    for seed in range(3):
        inst = generate(100, "uncorrelated", seed=seed)
        opt, _ = solve_exact(*inst)
        got = inst.values[AttentionKnapsack().solve(*inst)].sum()
        gaps.append((opt - got) / opt)
    assert calls and np.mean(gaps) < 0.01


def test_learned_queries_train():
    train = [generate(30, k, seed=50 + i) for i, k in enumerate(CLASSES)]
    model = AttentionKnapsack(num_candidates=3, bisection_steps=15)
    before = model.queries.detach().clone()
    losses = model.fit(train, steps=6, lr=0.05)
    assert losses[-1] < losses[0]
    assert not torch.equal(before, model.queries.detach()) and model.learned
    inst = generate(60, "weakly_correlated", seed=1)
    assert inst.weights[model.solve(*inst)].sum() <= inst.capacity


def test_capacity_edge_cases():
    w, v = np.array([3, 4, 5]), np.array([1, 2, 3])
    assert AttentionKnapsack().solve(w, v, 0).size == 0
    assert AttentionKnapsack().solve(w, v, 100).tolist() == [0, 1, 2]
    assert solve_exact(w, v, 100, method="dp")[1].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "weights, values, capacity, match",
    [
        ([1, 0, 2], [1, 1, 1], 3, "weights must all be > 0"),
        ([1, -2, 2], [1, 1, 1], 3, "weights must all be > 0"),
        ([1, 2, 2], [1, 1, 1], -1, "capacity"),
        ([1.0, np.nan, 2.0], [1, 1, 1], 3, "NaN"),
        ([1.0, 2.0, 2.0], [1, np.nan, 1], 3, "NaN"),
        ([1, 2], [1, 1, 1], 3, "one length"),
        ([1, 2, 3], [1, -1, 1], 3, "values"),
    ],
)
def test_bad_input(weights, values, capacity, match):
    w, v = np.array(weights), np.array(values)
    for fn in (AttentionKnapsack().solve, greedy_ratio, greedy_value, greedy_weight):
        with pytest.raises(ValueError, match=match):
            fn(w, v, capacity)
    if w.dtype.kind == "i" and v.dtype.kind == "i":
        with pytest.raises(ValueError, match=match):
            solve_exact(w, v, capacity)


def test_bad_generate_arguments():
    with pytest.raises(ValueError, match="kind"):
        generate(10, "nope")
    with pytest.raises(ValueError, match="n must"):
        generate(0, "uncorrelated")
    with pytest.raises(ValueError, match="capacity_fraction"):
        generate(10, "uncorrelated", capacity_fraction=1.5)
    with pytest.raises(TypeError, match="integer"):
        solve_exact(np.array([1.5, 2.0]), np.array([1, 2]), 3)
