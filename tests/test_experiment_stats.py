"""The experiment frame's statistics and verdict logic, against known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnkit.experiment import HELD, INCONCLUSIVE, NOT_HELD, Decision, Result, stats, verdict_of


def test_mean_ci_matches_scipy_percentile_bootstrap():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = np.array([0.71, 0.74, 0.69, 0.80, 0.77, 0.73, 0.75])
    ci = stats.mean_ci(x, n_boot=20_000)
    ref = scipy_stats.bootstrap((x,), np.mean, n_resamples=20_000, method="percentile",
                                random_state=0, confidence_level=0.95).confidence_interval
    assert ci.value == pytest.approx(x.mean())
    assert ci.low == pytest.approx(ref.low, abs=0.004)
    assert ci.high == pytest.approx(ref.high, abs=0.004)
    assert ci.low < ci.value < ci.high and ci.n == 7


def test_bootstrap_is_deterministic_and_degenerate_cases():
    x = [1.0, 2.0, 4.0]
    assert stats.mean_ci(x) == stats.mean_ci(x)
    one = stats.mean_ci([3.5])
    assert (one.value, one.low, one.high) == (3.5, 3.5, 3.5)
    same = stats.mean_ci([2.0, 2.0, 2.0])
    assert (same.low, same.high) == (2.0, 2.0)
    nan = stats.mean_ci([1.0, math.nan, 2.0])
    assert math.isnan(nan.value) and math.isnan(nan.low)
    with pytest.raises(ValueError, match="empty"):
        stats.mean_ci([])
    with pytest.raises(ValueError, match="level"):
        stats.mean_ci(x, level=1.5)


def test_paired_diff_uses_the_pairing():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 10, size=12)  # a large shared seed effect
    a, b = base + 0.5 + rng.normal(0, 0.05, 12), base
    paired = stats.paired_diff_ci(a, b)
    assert paired.value == pytest.approx(0.5, abs=0.05)
    assert paired.low > 0.4 and paired.high < 0.6  # the seed effect cancels
    unpaired_spread = stats.mean_ci(a).high - stats.mean_ci(a).low
    assert paired.high - paired.low < unpaired_spread / 10
    with pytest.raises(ValueError, match="paired"):
        stats.paired_diff_ci([1, 2], [1, 2, 3])


def test_ratio_ci_paired_and_unpaired():
    a = np.array([2.0, 2.2, 1.8, 2.1, 1.9])
    b = np.array([1.0, 1.1, 0.9, 1.05, 0.95])
    r = stats.ratio_ci(a, b)
    assert r.value == pytest.approx(a.mean() / b.mean())
    assert r.low <= 2.0 <= r.high and r.high - r.low < 0.05  # exactly proportional pairs
    u = stats.ratio_ci(a, b, paired=False)
    assert u.value == pytest.approx(r.value) and u.high - u.low > r.high - r.low
    assert math.isnan(stats.ratio_ci([1.0, 2.0], [0.0, 0.0]).value)


def test_loglog_slope_and_theil_sen():
    x = np.array([1e3, 2e3, 4e3, 8e3, 1.6e4, 3.2e4])
    assert stats.loglog_slope(x, 3 * x**1.5) == pytest.approx(1.5)
    assert stats.theil_sen_slope(x, 3 * x**1.5) == pytest.approx(1.5)
    y = 3 * x**1.0
    y_outlier = y.copy()
    y_outlier[-1] *= 5
    assert stats.theil_sen_slope(x, y_outlier) == pytest.approx(1.0)
    assert math.isnan(stats.loglog_slope([1.0], [1.0]))
    assert math.isnan(stats.loglog_slope([2.0, 2.0], [1.0, 3.0]))
    assert math.isnan(stats.loglog_slope([1.0, 2.0], [0.0, -1.0]))


def test_slope_ci_from_repeats_covers_the_true_slope():
    rng = np.random.default_rng(1)
    sizes = [1e4, 2e4, 4e4, 8e4, 1.6e5]
    repeats = [[1e-6 * n * float(np.exp(rng.normal(0, 0.05))) for _ in range(7)]
               for n in sizes]
    ci = stats.slope_ci(sizes, repeats)
    assert ci.low <= 1.0 <= ci.high
    assert ci.high - ci.low < 0.15
    # one noisy repeat at the top size widens the interval rather than moving the median much
    repeats[-1][0] *= 10
    noisy = stats.slope_ci(sizes, repeats)
    assert abs(noisy.value - 1.0) < 0.06
    with pytest.raises(ValueError, match="one sequence per size"):
        stats.slope_ci(sizes, repeats[:-1])


def test_cost_per_unit():
    cis = stats.cost_per_unit_ci([100, 200], [[1.0, 1.1, 0.9], [2.0, 2.2, 1.8]])
    assert [c.value for c in cis] == pytest.approx([0.01, 0.01])
    with pytest.raises(ValueError, match="positive"):
        stats.cost_per_unit_ci([0, 1], [[1.0], [1.0]])


def test_over_seeds_seeds_the_generators():
    import torch

    draws = stats.over_seeds(lambda s: float(torch.rand(())), [3, 4, 3])
    assert draws[0] == draws[2] != draws[1]
    stacked = stats.stack_metrics([{"a": 1.0, "b": 2.0}, {"a": 3.0}])
    assert stacked["a"].tolist() == [1.0, 3.0] and math.isnan(stacked["b"][1])
    with pytest.raises(ValueError, match="empty"):
        stats.over_seeds(lambda s: s, [])


def test_interleaved_times_alternate_cases():
    order = []
    times = stats.interleaved_times({"a": lambda: order.append("a"),
                                     "b": lambda: order.append("b")}, repeat=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_interleaved_times_uses_the_given_clock():
    ticks = iter(range(100))
    times = stats.interleaved_times({"a": lambda: next(ticks), "b": lambda: None}, repeat=2,
                                    warmup=1, clock=lambda: float(next(ticks)))
    # "a" advances the fake clock once more while it runs: 2 ticks per round, "b" 1 tick
    assert times == {"a": [2.0, 2.0], "b": [1.0, 1.0]}


def test_threads_restores():
    import torch

    old = torch.get_num_threads()
    with stats.single_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == old
    with pytest.raises(ValueError, match="positive"):
        with stats.threads(0):
            pass


# ------------------------------------------------------------------------------ verdicts


def test_decision_outcomes_and_margins():
    held = Decision("gain", 0.05, 0.02, 0.08, 0.0, ">")
    assert held.outcome == HELD and held.margin == pytest.approx(0.02)
    not_held = Decision("gain", -0.05, -0.08, -0.02, 0.0, ">")
    assert not_held.outcome == NOT_HELD and not_held.margin == pytest.approx(-0.02)
    straddle = Decision("gain", 0.01, -0.01, 0.03, 0.0, ">")
    assert straddle.outcome == INCONCLUSIVE and straddle.margin == 0.0
    touching = Decision("gain", 0.01, 0.0, 0.03, 0.0, ">")
    assert touching.outcome == INCONCLUSIVE
    below = Decision("ratio", 1.02, 1.01, 1.04, 1.05, "<")
    assert below.outcome == HELD and below.margin == pytest.approx(0.01)
    above = Decision("ratio", 1.2, 1.1, 1.3, 1.05, "<")
    assert above.outcome == NOT_HELD and above.margin == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="direction"):
        Decision("x", 1, 0, 2, 0, ">=")
    with pytest.raises(ValueError, match="ci_low"):
        Decision("x", 1, 2, 0, 0)


def test_nan_decision_is_inconclusive_and_named():
    d = Decision("slope", math.nan, math.nan, math.nan, 1.15, "<")
    assert d.outcome == INCONCLUSIVE and math.isnan(d.margin)
    assert "value" in d.explanation() and "NaN" in d.explanation()
    assert d.to_dict()["value"] is None


def test_verdict_of_combines():
    h = Decision("a", 1, 0.5, 1.5, 0)
    n = Decision("b", -1, -1.5, -0.5, 0)
    i = Decision("c", 0, -1, 1, 0)
    assert verdict_of([h, h]) == HELD
    assert verdict_of([h, i]) == INCONCLUSIVE
    assert verdict_of([h, i, n]) == NOT_HELD
    assert verdict_of([]) == INCONCLUSIVE


def test_result_metrics_carry_decision_intervals():
    ci = stats.mean_ci([0.1, 0.2, 0.3])
    r = Result(metrics={"other": 1.0}, decisions=[ci.decide("gain", 0.0)], seeds=3)
    m = r.all_metrics()
    assert m["gain"] == pytest.approx(0.2) and m["gain_ci_low"] == ci.low
    assert m["seeds"] == 3 and m["other"] == 1.0
    assert r.verdict == HELD
    assert Result(metrics={}, held=False).verdict == NOT_HELD
    with pytest.raises(ValueError, match="decisions"):
        Result(metrics={})


def test_result_dict_json_shape():
    from attnkit.experiment import Experiment
    from attnkit.experiment.report import result_dict

    exp = Experiment("x", "claim", run=lambda ctx: None)
    r = Result(metrics={}, decisions=[Decision("slope", math.nan, math.nan, math.nan, 1, "<")])
    obj = result_dict(exp, r, 1.0)
    assert obj["verdict"] == INCONCLUSIVE
    assert obj["decisions"][0]["name"] == "slope" and obj["decisions"][0]["margin"] is None
    assert "slope" in obj["notes"] and "NaN" in obj["notes"]
    assert obj["metrics"]["slope"] is None


def test_slope_diff_ci():
    sizes = [100, 200, 400, 800]
    rng = np.random.default_rng(0)
    quad = [[(n / 100) ** 2 * (1 + 0.05 * rng.standard_normal()) for _ in range(5)] for n in sizes]
    lin = [[(n / 100) * (1 + 0.05 * rng.standard_normal()) for _ in range(5)] for n in sizes]
    ci = stats.slope_diff_ci(sizes, quad, lin, n_boot=300)
    assert 0.8 < ci.low <= ci.value <= ci.high < 1.2
    same = stats.slope_diff_ci(sizes, [[float(n)] for n in sizes], [[2.0 * n] for n in sizes],
                               n_boot=200)
    assert abs(same.value) < 1e-9 and same.low == same.high
    a, b = stats.slope_ci(sizes, quad, n_boot=300), stats.slope_ci(sizes, lin, n_boot=300)
    assert ci.value == pytest.approx(a.value - b.value)
    with pytest.raises(ValueError, match="one sequence per size"):
        stats.slope_diff_ci(sizes, quad, lin[:2])


def test_interleaved_min_times_keeps_each_rounds_fastest_call():
    ticks = iter(range(1000))
    calls = []
    durations = {"a": iter([5, 1, 2, 7, 3, 3]), "b": iter([1, 1, 9, 4, 2, 8])}
    now = [0.0]

    def case(name):
        def run():
            calls.append(name)
            now[0] += next(durations[name])
        return run

    got = stats.interleaved_min_times({"a": case("a"), "b": case("b")}, repeat=3, calls=2,
                                      warmup=0, clock=lambda: now[0] + 0 * next(ticks))
    assert calls == ["a", "b"] * 6  # interleaved call by call
    assert got == {"a": [1, 2, 3], "b": [1, 4, 2]}
    with pytest.raises(ValueError, match="calls"):
        stats.interleaved_min_times({"a": case("a")}, calls=0)
