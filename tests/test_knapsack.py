"""Knapsack: exact solver vs brute force, Pisinger class definitions, the attention heuristic's
feasibility, and bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.experiment.stats import CI
from attnkit.knapsack import (
    CLASSES,
    AttentionKnapsack,
    generate,
    greedy_fill,
    greedy_random,
    greedy_ratio,
    greedy_ratio_best_item,
    greedy_value,
    greedy_weight,
    optimum_value,
    pisinger_capacity_fraction,
    solve_exact,
    with_best_item,
)
from attnkit.knapsack.experiment import _instance_seed, every_point, worst_point


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
    c = int(rng.integers(1, w.sum() + 2))
    value, items = solve_exact(w, v, c, method="dp")
    assert value == _brute_force(w, v, c) == optimum_value(w, v, c)
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
    assert AttentionKnapsack().solve(w, v, 2).size == 0  # every item heavier: all skipped
    assert AttentionKnapsack().solve(w, v, 100).tolist() == [0, 1, 2]
    # items heavier than the capacity are skipped, not an error, and do not distort the rest
    w2, v2 = np.array([3, 400, 4, 5]), np.array([1, 10_000, 2, 3])
    assert AttentionKnapsack().solve(w2, v2, 9).tolist() == [2, 3]
    assert optimum_value(w2, v2, 9) == 5
    assert solve_exact(w, v, 100, method="dp")[1].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "weights, values, capacity, match",
    [
        ([1, 0, 2], [1, 1, 1], 3, "weights must all be > 0"),
        ([1, -2, 2], [1, 1, 1], 3, "weights must all be > 0"),
        ([1, 2, 2], [1, 1, 1], -1, "capacity"),
        ([1, 2, 2], [1, 1, 1], 0, "capacity"),
        ([], [], 3, "empty"),
        ([1.0, np.nan, 2.0], [1, 1, 1], 3, "NaN"),
        ([1.0, 2.0, 2.0], [1, np.nan, 1], 3, "NaN"),
        ([1, 2], [1, 1, 1], 3, "one length"),
        ([1, 2, 3], [1, -1, 1], 3, "values"),
    ],
)
def test_bad_input(weights, values, capacity, match):
    w, v = np.array(weights), np.array(values)
    for fn in (AttentionKnapsack().solve, greedy_ratio, greedy_value, greedy_weight,
               greedy_ratio_best_item, optimum_value):
        with pytest.raises(ValueError, match=match):
            fn(w, v, capacity)
    if w.dtype.kind == "i" and v.dtype.kind == "i":
        with pytest.raises(ValueError, match=match):
            solve_exact(w, v, capacity)
    with pytest.raises(ValueError, match=match if w.shape == v.shape else "shape"):
        AttentionKnapsack().solve_batch(w[None], v[None], np.array([capacity]))


def test_bad_generate_arguments():
    with pytest.raises(ValueError, match="kind"):
        generate(10, "nope")
    with pytest.raises(ValueError, match="n must"):
        generate(0, "uncorrelated")
    with pytest.raises(ValueError, match="capacity_fraction"):
        generate(10, "uncorrelated", capacity_fraction=1.5)
    with pytest.raises(TypeError, match="integer"):
        solve_exact(np.array([1.5, 2.0]), np.array([1, 2]), 3)


def _pisinger(n, kind, seed, h=50):
    return generate(n, kind, R=1000, seed=seed, capacity_fraction=pisinger_capacity_fraction(h))


@pytest.mark.parametrize("kind", CLASSES)
def test_optimum_value_matches_plain_dp(kind):
    """The reduced DP is exact: equal to the full DP on every class and several capacities."""
    for seed, h in enumerate((5, 25, 50, 75, 95)):
        inst = _pisinger(60, kind, seed, h)
        assert optimum_value(*inst) == solve_exact(*inst, method="dp")[0]


@pytest.mark.parametrize("kind", CLASSES)
def test_strategies_vs_exact_on_small_instances(kind):
    solver = AttentionKnapsack()
    for seed in range(4):
        inst = _pisinger(14, kind, seed, h=30 + 10 * seed)
        opt = _brute_force(*inst)
        assert optimum_value(*inst) == opt
        for items in (solver.solve(*inst), greedy_ratio(*inst), greedy_ratio_best_item(*inst),
                      greedy_random(*inst, seed=seed),
                      with_best_item(*inst, solver.solve(*inst))):
            assert inst.weights[items].sum() <= inst.capacity
            assert 0 <= inst.values[items].sum() <= opt
        assert inst.values[greedy_ratio_best_item(*inst)].sum() * 2 >= opt


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 25), seed=st.integers(0, 10_000), frac=st.floats(0.01, 0.99))
def test_best_item_fix_never_worse(n, seed, frac):
    rng = np.random.default_rng(seed)
    w = rng.integers(1, 50, n)
    v = rng.integers(0, 50, n)
    c = max(1, int(frac * w.sum()))
    for items in (greedy_ratio(w, v, c), greedy_random(w, v, c, seed=seed),
                  AttentionKnapsack(num_candidates=3, bisection_steps=12).solve(w, v, c)):
        fixed = with_best_item(w, v, c, items)
        assert v[fixed].sum() >= v[items].sum() and w[fixed].sum() <= c


@pytest.mark.parametrize("C", [10, 100, 1000, 10**6])
def test_half_guarantee_on_adversarial_cases(C):
    """The ratio rule alone can be arbitrarily bad (a light item with a high ratio blocks the
    big one); with the best-item fix it is at least half the optimum."""
    w, v = np.array([1, C]), np.array([2, C])
    assert greedy_ratio(w, v, C).tolist() == [0]  # value 2 of an optimum C
    assert v[greedy_ratio_best_item(w, v, C)].sum() == C
    # many small high-ratio items that leave room for none of the large ones
    w = np.array([1] * 5 + [C] * 3)
    v = np.array([3] * 5 + [C] * 3)
    cap = C + 4
    opt = _brute_force(w, v, cap)
    assert 2 * v[greedy_ratio_best_item(w, v, cap)].sum() >= opt
    assert 2 * v[with_best_item(w, v, cap, AttentionKnapsack().solve(w, v, cap))].sum() >= opt


def test_greedy_fill_rounds_equal_the_sequential_scan():
    rng = np.random.default_rng(5)
    for _ in range(50):
        n = int(rng.integers(1, 60))
        w = rng.integers(1, 40, n)
        cap = int(rng.integers(1, w.sum() + 5))
        order = rng.permutation(n)
        room, expect = cap, []
        for i in order:
            if w[i] <= room:
                expect.append(i)
                room -= w[i]
        assert greedy_fill(w, cap, order).tolist() == sorted(expect)


def test_solve_batch_equals_single_solves():
    solver = AttentionKnapsack()
    insts = [_pisinger(40, CLASSES[i % 6], i, h=20 + 10 * i) for i in range(7)]
    W = np.stack([x.weights for x in insts])
    V = np.stack([x.values for x in insts])
    C = np.array([x.capacity for x in insts])
    batch = solver.solve_batch(W, V, C)
    assert len(batch) == 7
    for got, inst in zip(batch, insts):
        assert got.tolist() == solver.solve(*inst).tolist()
    as_tensors = solver.solve_batch(torch.from_numpy(W), torch.from_numpy(V), torch.from_numpy(C))
    assert all(a.tolist() == b.tolist() for a, b in zip(batch, as_tensors))
    with pytest.raises(ValueError, match="capacities"):
        solver.solve_batch(W, V, C[:3])
    with pytest.raises(ValueError, match=r"\(B, n\)"):
        solver.solve_batch(W[0], V[0], C[0])


def test_solve_at_10000_items_is_feasible_and_close():
    """Correctness at n = 10,000 (the speed is measured by the experiment, not asserted)."""
    inst = generate(10_000, "uncorrelated", seed=3)
    items = AttentionKnapsack().solve(*inst)
    assert inst.weights[items].sum() <= inst.capacity
    got = inst.values[items].sum()
    assert got >= inst.values[greedy_ratio(*inst)].sum() * 0.999


def test_pisinger_capacity_fraction():
    assert pisinger_capacity_fraction(50, 100) == 50 / 101
    for bad in (0, 101, 2.5):
        with pytest.raises(ValueError, match="h must"):
            pisinger_capacity_fraction(bad, 100)


def test_worst_point_three_valued():
    held = {"a": CI(0.0, -0.1, 0.05, 5), "b": CI(0.0, -0.2, 0.08, 5)}
    assert worst_point(held, 0.1, "<")[0] == "b"
    assert worst_point(held, 0.1, "<")[1].decide("x", 0.1, "<").outcome == "held"
    straddle = {**held, "c": CI(0.1, 0.0, 0.3, 5)}
    assert worst_point(straddle, 0.1, "<")[1].decide("x", 0.1, "<").outcome == "inconclusive"
    failing = {**straddle, "d": CI(0.5, 0.2, 0.9, 5)}
    key, ci = worst_point(failing, 0.1, "<")
    assert key == "d" and ci.decide("x", 0.1, "<").outcome == "not held"


def test_every_point_decision():
    held = {"a": CI(0.0, -0.1, 0.05, 5), "b": CI(0.0, -0.2, 0.08, 5)}
    dec, counts = every_point("x", held, 0.1, "<")
    assert dec.outcome == "held" and counts == {"held": 2, "not_held": 0, "undecided": 0,
                                                "nan": 0}
    # per-point thresholds: "b" passes 0.1 but not its own 0.05 (straddles it)
    dec, counts = every_point("x", held, {"a": 0.1, "b": 0.05}, "<")
    assert dec.outcome == "inconclusive" and "undecided: b" in dec.note
    assert dec.threshold == 0.05
    # a NaN point (and no failing one) makes it inconclusive, named in the note
    nan = {**held, "c": CI(math.nan, math.nan, math.nan, 5)}
    dec, counts = every_point("x", nan, 0.1, "<")
    assert dec.outcome == "inconclusive" and math.isnan(dec.value) and "NaN at c" in dec.note
    assert counts["nan"] == 1
    dec, _ = every_point("x", held, {"a": 0.1, "b": math.nan}, "<")  # NaN threshold too
    assert dec.outcome == "inconclusive" and "NaN at b" in dec.note
    # a point wholly on the wrong side decides "not held", even beside a NaN one
    failing = {**nan, "d": CI(0.5, 0.2, 0.9, 5)}
    dec, counts = every_point("x", failing, 0.1, "<")
    assert dec.outcome == "not held" and "not held at: d" in dec.note and counts["not_held"] == 1
    # identical choices (difference identically 0) against the tie floor: held
    tie = {"t": CI(0.0, 0.0, 0.0, 40)}
    assert every_point("x", tie, 1e-6, "<")[0].outcome == "held"


def test_instance_seeds_distinct():
    from attnkit.knapsack.instances import CLASSES

    keys = [(k, n, h, i) for k in CLASSES for n in (20, 50, 100, 200, 500, 1000)
            for h in (10, 25, 50, 75, 90) for i in range(60)]
    seeds = {_instance_seed(0, *key) for key in keys}
    assert len(seeds) == len(keys)
    assert _instance_seed(0, "uncorrelated", 20, 25, 3) == _instance_seed(0, "uncorrelated", 20,
                                                                          25, 3)
    assert _instance_seed(1, "uncorrelated", 20, 25, 3) != _instance_seed(0, "uncorrelated",
                                                                          20, 25, 3)
