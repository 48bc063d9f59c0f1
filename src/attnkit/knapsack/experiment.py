"""Experiment ``knapsack``: the two-head attention heuristic across Pisinger's regime (six
instance classes, sizes n = 20..1000, capacities c = h/(H+1) * sum(w)) against the exact optimum,
the ratio rule (with and without the best-single-item fix), learned heads and a random order."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..argtypes import positive_int
from ..experiment import Decision, Experiment, Option, Result, RunContext, stats
from ..experiment.stats import CI
from .attention import AttentionKnapsack, KnapsackAttentionResult
from .instances import CLASSES, KnapsackInstance, generate, pisinger_capacity_fraction
from .solvers import (
    greedy_random,
    greedy_ratio,
    greedy_ratio_best_item,
    optimum_value,
    with_best_item,
)

STRATEGIES = ("attention", "attention_learned", "attention_best_item", "ratio",
              "ratio_best_item", "random")
SIZES_FULL = (20, 50, 100, 200, 500, 1000)
SIZES_QUICK = (20, 50, 200, 500)
H = 100  # Pisinger (2005): c = h / (H + 1) * sum(w), h = 1..H
HS_FULL = (10, 25, 50, 75, 90)
HS_QUICK = (25, 50, 75)
R = 1000  # data range: weights in [1, R] (Pisinger's R = 10^3 series)
#: (a) attention "within the ratio rule's CI or better": at a point, the paired CI of (attention
#: gap - ratio gap) must lie below the upper half-width of the ratio rule's own CI there (how far
#: above the ratio rule's mean its interval reaches), floored at TIE_PP so that attention picking
#: exactly the ratio rule's items (a difference identically 0) counts as "or better".
TIE_PP = 1e-6
#: (b) "effective": mean gap below this (percent of the optimum) for every class at n >= 200.
EFFECTIVE_PCT = 1.0
LARGE_N = 200
#: Instances per (class, n, h) point, the same at every point and for every strategy (the
#: issue asks for >= 20; 40 narrows the per-point intervals and fits the quick budget).
INSTANCES_PER_POINT = 40
N_BOOT_POINTS = 2_000  # bootstrap resamples for the many per-point intervals


def _signed(x: float, threshold: float, direction: str) -> float:
    """How far ``x`` lies on the claim's side of ``threshold`` (negative: the other side)."""
    return x - threshold if direction == ">" else threshold - x


def worst_point(cis: dict[str, CI], threshold: float | dict[str, float], direction: str
                ) -> tuple[str, CI]:
    """The one point that decides "the claim holds at every point" with three-valued logic:
    a point wholly on the wrong side of its threshold if there is one (-> not held), else the
    point whose interval reaches nearest to / across its threshold (held only when even that
    one is on the claim's side; inconclusive when it straddles). ``threshold`` is one number
    or one per point. Points with a NaN bound are skipped here (see :func:`every_point`)."""
    def th(k: str) -> float:
        return threshold[k] if isinstance(threshold, dict) else threshold

    def near_far(k: str) -> tuple[float, float]:
        a, b = sorted((_signed(cis[k].low, th(k), direction),
                       _signed(cis[k].high, th(k), direction)))
        return a, b

    finite = [k for k in cis if not any(map(math.isnan, near_far(k)))]
    if not finite:
        raise ValueError("worst_point needs at least one point with a finite interval")
    failing = [k for k in finite if near_far(k)[1] <= 0]
    if failing:
        key = min(failing, key=lambda k: near_far(k)[1])
    else:
        key = min(finite, key=lambda k: near_far(k)[0])
    return key, cis[key]


def _names(keys: list[str], most: int = 4) -> str:
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def every_point(name: str, cis: dict[str, CI], threshold: float | dict[str, float],
                direction: str, what: str = "") -> tuple[Decision, dict[str, int]]:
    """One :class:`Decision` for "the claim holds at every point": ``"not held"`` from a point
    whose interval lies wholly on the wrong side of its threshold; otherwise ``"inconclusive"``
    with a NaN value when any point's interval or threshold is NaN (the note names those
    points); otherwise the worst point decides (held only when every interval is on the claim's
    side; the note names the points that straddle). Also returns the counts per outcome
    (``held``, ``not_held``, ``undecided``, ``nan``)."""
    if not cis:
        raise ValueError("every_point needs at least one point")
    th = threshold if isinstance(threshold, dict) else dict.fromkeys(cis, threshold)
    outcome = {}
    for k, ci in cis.items():
        bounds = (ci.low, ci.high, ci.value, th[k])
        if any(map(math.isnan, bounds)):
            outcome[k] = "nan"
            continue
        a, b = sorted((_signed(ci.low, th[k], direction), _signed(ci.high, th[k], direction)))
        outcome[k] = "held" if a > 0 else "not_held" if b <= 0 else "undecided"
    counts = {o: sum(v == o for v in outcome.values())
              for o in ("held", "not_held", "undecided", "nan")}
    nan_keys = [k for k, o in outcome.items() if o == "nan"]
    undecided = [k for k, o in outcome.items() if o == "undecided"]
    summary = (f"{counts['held']} of {len(cis)} points held, {counts['not_held']} not held, "
               f"{counts['undecided']} undecided, {counts['nan']} NaN")
    if counts["not_held"] == 0 and nan_keys:
        return Decision(name, math.nan, math.nan, math.nan, 0.0, direction,
                        note=f"NaN at {_names(nan_keys)}; {summary}"), counts
    key, ci = worst_point({k: cis[k] for k in cis if k not in nan_keys}, th, direction)
    note = f"deciding point: {key}{what}; {summary}"
    failing = [k for k, o in outcome.items() if o == "not_held"]
    if failing:
        note += f"; not held at: {_names(failing, 8)}"
    if undecided:
        note += f"; undecided: {_names(undecided)}"
    return ci.decide(name, th[key], direction, note=note), counts


def _strategies(designed: AttentionKnapsack, learned: AttentionKnapsack
                ) -> dict[str, Callable[[KnapsackInstance, int], np.ndarray]]:
    def att_best(inst: KnapsackInstance, seed: int) -> np.ndarray:
        return with_best_item(*inst, designed.solve(*inst))

    return {
        "attention": lambda inst, seed: designed.solve(*inst),
        "attention_learned": lambda inst, seed: learned.solve(*inst),
        "attention_best_item": att_best,
        "ratio": lambda inst, seed: greedy_ratio(*inst),
        "ratio_best_item": lambda inst, seed: greedy_ratio_best_item(*inst),
        "random": lambda inst, seed: greedy_random(*inst, seed=seed),
    }


def _instance_seed(base: int, kind: str, n: int, h: int, i: int) -> int:
    """A fixed seed per instance (run seed, class, size, capacity, index): distinct tuples give
    independent streams (a linear formula made e.g. (n=20, i=3) and (n=50, i=0) collide, so
    the small instance was a prefix of the larger one)."""
    ss = np.random.SeedSequence([base, CLASSES.index(kind), n, h, i])
    return int(ss.generate_state(1, np.uint32)[0])


def _speed(designed: AttentionKnapsack, seed: int, repeat: int) -> dict[str, float]:
    """Median time of one solve at n = 10,000 and the per-instance time of a batched solve."""
    big = generate(10_000, "uncorrelated", R=R, seed=seed + 77)
    designed.solve(*big)  # warm-up
    single = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        designed.solve(*big)
        single.append(time.perf_counter() - t0)
    batch = [generate(1000, CLASSES[i % len(CLASSES)], R=R, seed=seed + 500 + i)
             for i in range(60)]
    W = np.stack([b.weights for b in batch])
    V = np.stack([b.values for b in batch])
    C = np.array([b.capacity for b in batch])
    t0 = time.perf_counter()
    designed.solve_batch(W, V, C)
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in batch:
        designed.solve(*b)
    t_loop = time.perf_counter() - t0
    return {"time_ms_attention_solve_n10000": 1000 * statistics.median(single),
            "time_ms_attention_solve_n10000_min": 1000 * min(single),
            "time_ms_per_instance_solve_batch_n1000": 1000 * t_batch / len(batch),
            "time_ms_per_instance_solve_loop_n1000": 1000 * t_loop / len(batch)}


def _run(ctx: RunContext) -> Result:
    per_point = ctx.options.get("instances") or INSTANCES_PER_POINT
    sizes = SIZES_QUICK if ctx.quick else SIZES_FULL
    hs = HS_QUICK if ctx.quick else HS_FULL
    fit_steps = 40 if ctx.quick else 100
    designed, learned = AttentionKnapsack(), AttentionKnapsack()
    # training instances for the learned heads: seeds far from every test instance's
    train = [generate(50, kind, R=R, seed=10**9 + 7 * s + ctx.seed)
             for kind in CLASSES for s in range(1 if ctx.quick else 3)]
    t0 = time.perf_counter()
    losses = learned.fit(train, steps=fit_steps, lr=0.05, seed=ctx.seed)
    fit_seconds = time.perf_counter() - t0
    ctx.log(f"learned queries: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {fit_seconds:.1f}s")
    solvers = _strategies(designed, learned)

    gaps: dict[tuple[str, int, int, str], list[float]] = {}
    times: dict[tuple[int, str], list[float]] = {}
    points = [(kind, n, h) for n in sizes for kind in CLASSES for h in hs]
    for kind, n, h in ctx.progress(points, desc="knapsack points", total=len(points)):
        for i in range(per_point):
            seed = _instance_seed(ctx.seed, kind, n, h, i)
            inst = generate(n, kind, R=R, seed=seed,
                            capacity_fraction=pisinger_capacity_fraction(h, H))
            t0 = time.perf_counter()
            opt = optimum_value(*inst)
            times.setdefault((n, "exact"), []).append(time.perf_counter() - t0)
            for name, solve in solvers.items():
                t0 = time.perf_counter()
                items = solve(inst, seed)
                times.setdefault((n, name), []).append(time.perf_counter() - t0)
                if inst.weights[items].sum() > inst.capacity:  # never expected
                    raise AssertionError(f"{name} exceeded the capacity")
                gap = 100.0 * (opt - int(inst.values[items].sum())) / opt
                gaps.setdefault((kind, n, h, name), []).append(gap)

    def pooled(kind: str, n: int, name: str) -> np.ndarray:
        return np.concatenate([gaps[(kind, n, h, name)] for h in hs])

    boot = {"n_boot": N_BOOT_POINTS}
    # (a) at every (class, n, h): attention gap - ratio gap, paired by instance, against the
    # upper half-width of the ratio rule's CI at that point
    diff_cis, ratio_hw = {}, {}
    for kind, n, h in points:
        key = f"{kind} n={n} h={h}"
        diff_cis[key] = stats.paired_diff_ci(gaps[(kind, n, h, "attention")],
                                             gaps[(kind, n, h, "ratio")], **boot)
        r = stats.mean_ci(gaps[(kind, n, h, "ratio")], **boot)
        ratio_hw[key] = max(r.high - r.value, TIE_PP) if not math.isnan(r.high) else math.nan
    dec_a, counts_a = every_point(
        "attention_minus_ratio_gap_pp_worst_point", diff_cis, ratio_hw, "<",
        what=" (threshold: the ratio rule's CI upper half-width there)")
    # (b) every class at every n >= 200 (capacities pooled): mean attention gap
    large = [n for n in sizes if n >= LARGE_N]
    gap_cis = {(kind, n, name): stats.mean_ci(pooled(kind, n, name), **boot)
               for kind in CLASSES for n in sizes for name in STRATEGIES}
    eff = {f"{kind} n={n}": gap_cis[(kind, n, "attention")] for kind in CLASSES for n in large}
    dec_b, counts_b = every_point("gap_pct_attention_worst_point_n_ge_200", eff, EFFECTIVE_PCT,
                                  "<")
    decisions = [dec_a, dec_b]

    metrics: dict[str, float] = {}
    table = []
    for kind in CLASSES:
        for name in ("attention", "ratio", *[s for s in STRATEGIES
                                             if s not in ("attention", "ratio")]):
            metrics[f"gap_pct_{name}_{kind}"] = float(np.mean(
                np.concatenate([pooled(kind, n, name) for n in large])))
        for n in sizes:
            row: dict[str, object] = {"class": kind, "n": n, "instances": per_point * len(hs)}
            for name in STRATEGIES:
                ci = gap_cis[(kind, n, name)]
                metrics[f"gap_pct_{name}_{kind}_n{n}"] = ci.value
                row[f"gap_pct_{name}"] = round(ci.value, 4)
            d = stats.paired_diff_ci(pooled(kind, n, "attention"), pooled(kind, n, "ratio"),
                                     **boot)
            row["att_minus_ratio_pp"] = f"{d.value:.3f} [{d.low:.3f}, {d.high:.3f}]"
            a = gap_cis[(kind, n, "attention")]
            row["gap_pct_attention_ci"] = f"[{a.low:.3f}, {a.high:.3f}]"
            table.append(row)
    for n in sizes:
        for name in (*STRATEGIES, "exact"):
            metrics[f"time_ms_{name}_n{n}"] = 1000.0 * float(np.mean(times[(n, name)]))
    speed = _speed(designed, ctx.seed, repeat=7 if ctx.quick else 21)
    metrics.update(speed)
    metrics["fit_seconds_learned"] = fit_seconds

    small = min(sizes)
    worst_small = max(CLASSES, key=lambda k: gap_cis[(k, small, "attention")].value)
    ws = gap_cis[(worst_small, small, "attention")]
    fix_gain = max(metrics[f"gap_pct_attention_{k}_n{small}"]
                   - metrics[f"gap_pct_attention_best_item_{k}_n{small}"] for k in CLASSES)
    worst_large = max(CLASSES, key=lambda k: metrics[f"gap_pct_attention_{k}"])
    notes = (
        f"Instances: Pisinger's six classes, R={R}, n in {list(sizes)}, capacities "
        f"c = h/(H+1) * sum(w) with H={H}, h in {list(hs)}; {per_point} instances per (class, n, "
        f"h), {per_point * len(hs)} per (class, n). Generator parameters fixed in advance; "
        "instance seeds are a fixed function of (run seed, class, n, h, index). Exact optimum: "
        "Dembo-Hammer reduction + value-only DP (exact; checked against a plain DP and brute "
        f"force in the tests), {metrics[f'time_ms_exact_n{max(sizes)}']:.1f} ms per "
        f"n={max(sizes)} instance. Attention = designed heads, temperature ratio per instance "
        f"(bisection to the LP multiplier, {designed.num_candidates} ratios around it, best "
        f"fill kept); learned = queries fitted on {len(train)} n=50 instances for {fit_steps} "
        f"steps ({fit_seconds:.1f}s). "
        f"(a) attention gap - ratio gap (pp), paired by instance, at each of {len(diff_cis)} "
        "(class, n, h) points, must lie below the upper half-width of the ratio rule's 95% CI "
        f"at that point (attention within the ratio rule's CI or better; floor {TIE_PP} pp so "
        f"identical choices count): {counts_a['held']} held, {counts_a['not_held']} not held, "
        f"{counts_a['undecided']} undecided, {counts_a['nan']} NaN; {dec_a.explanation()} "
        f"({dec_a.note}). (b) mean attention gap at n >= {LARGE_N} (capacities pooled): "
        f"{dec_b.explanation()} ({dec_b.note}); worst class overall {worst_large} at "
        f"{metrics[f'gap_pct_attention_{worst_large}']:.3f}% (ratio "
        f"{metrics[f'gap_pct_ratio_{worst_large}']:.3f}%). Small n (reported, not part of (b)): "
        f"worst at n={small} is {worst_small}: {ws} %. Best-single-item fix on attention: "
        f"lowers the mean gap by at most {fix_gain:.3f} pp at n={small}. Speed: "
        f"AttentionKnapsack().solve at n=10,000 median "
        f"{speed['time_ms_attention_solve_n10000']:.1f} ms (target < 50 ms; wall-clock on a "
        f"shared CPU, noisy); solve_batch of 60 n=1000 instances "
        f"{speed['time_ms_per_instance_solve_batch_n1000']:.2f} ms per instance vs "
        f"{speed['time_ms_per_instance_solve_loop_n1000']:.2f} ms in a loop of solve."
    )
    figures = _figures(ctx, sizes, gap_cis, times)
    heads = _heads_figure(ctx, generate(50, "uncorrelated", R=R, seed=ctx.seed))
    if heads:
        figures.append(heads)
    return Result(
        metrics=metrics, decisions=decisions, seeds=1, table=table, figures=figures,
        params={"R": R, "H": H, "h": list(hs), "sizes": list(sizes),
                "instances_per_point": per_point, "fit_steps": fit_steps,
                "mechanism_threshold": "ratio CI upper half-width per point",
                "effective_pct": EFFECTIVE_PCT,
                "strategies": list(STRATEGIES)},
        notes=notes,
    )


def _figures(ctx: RunContext, sizes: Sequence[int], gap_cis: dict, times: dict) -> list[str]:
    plt = ctx.pyplot()
    if plt is None:
        return []
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), sharex=True)
    for ax, kind in zip(axes.ravel(), CLASSES):
        for name in STRATEGIES:
            cis = [gap_cis[(kind, n, name)] for n in sizes]
            y = np.array([c.value for c in cis])
            err = np.array([[c.value - c.low for c in cis], [c.high - c.value for c in cis]])
            ax.errorbar(sizes, y, yerr=err, marker="o", ms=3, capsize=2, label=name)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xticks(list(sizes), [str(n) for n in sizes])
        ax.axhline(EFFECTIVE_PCT, color="gray", ls=":", lw=1)
        ax.set_title(kind.replace("_", " "))
        ax.set_xlabel("items n")
        ax.set_ylabel("mean gap to optimum (%)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("knapsack: mean gap (95% CI) vs n; dotted: 1%")
    paths = [ctx.save_figure(fig, "knapsack_gap_vs_n.png")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("exact", *STRATEGIES):
        ax.loglog(sizes, [1000 * np.mean(times[(n, name)]) for n in sizes], "o-", label=name)
    ax.set_xticks(list(sizes), [str(n) for n in sizes])
    ax.set_xlabel("items n")
    ax.set_ylabel("ms per instance (mean)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    paths.append(ctx.save_figure(fig, "knapsack_time_vs_n.png"))
    return paths


def _heads_figure(ctx: RunContext, inst: KnapsackInstance) -> str | None:
    plt = ctx.pyplot()
    if plt is None:
        return None
    res: KnapsackAttentionResult = AttentionKnapsack().solve_detailed(*inst)
    order = np.argsort(-(inst.values / inst.weights))  # items by value/weight
    chosen = np.zeros(inst.n, dtype=bool)
    chosen[res.items] = True
    x = np.arange(inst.n)
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    axes[0].semilogy(x, res.weight_head[order], "o-", ms=3, label="head 1: weight watcher")
    axes[0].semilogy(x, res.value_head[order], "s-", ms=3, label="head 2: value seeker")
    axes[0].set_ylabel("attention weight")
    axes[0].legend()
    prod = res.product[order]
    axes[1].semilogy(x, prod, "-", color="gray", lw=1)
    axes[1].semilogy(x[chosen[order]], prod[chosen[order]], "o", color="tab:green", ms=4,
                     label="chosen")
    axes[1].semilogy(x[~chosen[order]], prod[~chosen[order]], "x", color="tab:red", ms=4,
                     label="left out")
    axes[1].set_ylabel("product of heads")
    axes[1].set_xlabel("item (sorted by value/weight)")
    axes[1].legend()
    t1, t2 = res.temperatures
    fig.suptitle(f"{inst.kind}, n={inst.n}: t2/t1 = {res.multiplier:.3g} "
                 f"(t1={t1:.3g}, t2={t2:.3g})")
    return ctx.save_figure(fig, "knapsack_heads.png")


EXPERIMENT = Experiment(
    name="knapsack",
    claim=(
        "The product of two attention heads (one attending to light items, one to valuable "
        "items, temperature ratio chosen per instance) with a greedy fill is a remarkably "
        "effective knapsack strategy: (a) at every Pisinger class, size and capacity it is as "
        "close to the optimum as the value/weight ratio rule or closer, and (b) its mean gap "
        "is within 1% of the optimum for n >= 200 in every class."
    ),
    run=_run,
    options=(Option("--instances", type=positive_int, default=None,
                    help=f"instances per (class, n, h) point (default {INSTANCES_PER_POINT})"),),
    description="0-1 knapsack by two attention heads vs exact optimum and greedy rules, "
                "across Pisinger's classes, sizes and capacities",
)
