"""Statistics for experiments: repeats over seeds, bootstrap confidence intervals, log-log
slopes from repeated timings, an interleaved timer and thread pinning.

Every interval here is a 95% percentile bootstrap with a fixed RNG seed, so the same numbers
give the same interval. A :class:`CI` turns into a :class:`~attnkit.experiment.types.Decision`
with :meth:`CI.decide`, which is how an experiment states what decides its claim::

    gains = paired_diff_ci(auc_bias, auc_nobias)          # per-seed values, paired by seed
    decision = gains.decide("auc_gain_at_0p5", threshold=0.0, direction=">")

NaN anywhere in the input gives a NaN interval, and a NaN interval an ``"inconclusive"``
decision: a missing number never becomes a verdict.
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..checks import check_positive_int
from .profiling import sync_device
from .types import Decision

__all__ = [
    "CI",
    "bootstrap_ci",
    "mean_ci",
    "paired_diff_ci",
    "ratio_ci",
    "loglog_slope",
    "slope_ci",
    "slope_diff_ci",
    "theil_sen_slope",
    "cost_per_unit_ci",
    "over_seeds",
    "seed_everything",
    "stack_metrics",
    "interleaved_times",
    "interleaved_min_times",
    "median",
    "threads",
    "single_thread",
]

LEVEL = 0.95
N_BOOT = 10_000
BOOT_SEED = 12345
T = TypeVar("T")
K = TypeVar("K")  # a case's key: any hashable name


@dataclass(frozen=True)
class CI:
    """An estimate with its confidence interval, and how many observations it rests on."""

    value: float
    low: float
    high: float
    n: int

    def decide(self, name: str, threshold: float, direction: str = ">",
               note: str = "") -> Decision:
        """The :class:`Decision` that this interval lies on the claim's side of ``threshold``."""
        return Decision(name, self.value, self.low, self.high, threshold, direction, note)

    def metrics(self, name: str) -> dict[str, float]:
        """``{name, name_ci_low, name_ci_high}`` for a result's flat metrics."""
        return {name: self.value, f"{name}_ci_low": self.low, f"{name}_ci_high": self.high}

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


_NAN_CI = (math.nan, math.nan, math.nan)


def _as_1d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty: nothing to estimate")
    return a


def _check_level(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100, got {n_boot}")


def bootstrap_ci(
    samples: Sequence[Any] | np.ndarray,
    statistic: Callable[[np.ndarray], float],
    *,
    level: float = LEVEL,
    n_boot: int = N_BOOT,
    seed: int = BOOT_SEED,
) -> CI:
    """Percentile bootstrap interval of ``statistic(samples)``.

    ``samples`` is an array whose first axis is resampled with replacement (rows stay
    together, so paired observations stay paired); ``statistic`` maps such an array to a number.
    With one observation the interval collapses to the estimate (no spread can be seen); with
    NaN anywhere the estimate and interval are NaN.
    """
    _check_level(level, n_boot)
    a = np.asarray(samples, dtype=np.float64)
    if a.ndim == 0 or a.shape[0] == 0:
        raise ValueError("samples must have at least one observation along the first axis")
    n = a.shape[0]
    if np.isnan(a).any():
        return CI(*_NAN_CI, n)
    est = float(statistic(a))
    if n == 1:
        return CI(est, est, est, n)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boots = np.array([statistic(a[i]) for i in idx], dtype=np.float64)
    return _percentile_ci(est, boots, n, level)


def _percentile_ci(est: float, boots: np.ndarray, n: int, level: float) -> CI:
    """The percentile interval of the finite bootstrap replicates ``boots`` around ``est``."""
    boots = boots[np.isfinite(boots)]
    if boots.size == 0:
        return CI(est, math.nan, math.nan, n)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boots, [alpha, 1.0 - alpha])
    return CI(est, float(low), float(high), n)


def mean_ci(values: Sequence[float] | np.ndarray, **kw: Any) -> CI:
    """The mean of ``values`` with its bootstrap interval."""
    a = _as_1d(values, "values")
    return bootstrap_ci(a, np.mean, **kw)


def paired_diff_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                   **kw: Any) -> CI:
    """Mean of ``a[i] - b[i]`` (paired, e.g. by seed or split) with its bootstrap interval."""
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must be paired (same length), got {x.size} and {y.size}")
    return bootstrap_ci(x - y, np.mean, **kw)


def ratio_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
             paired: bool = True, **kw: Any) -> CI:
    """``mean(a) / mean(b)`` with its bootstrap interval.

    ``paired=True`` resamples pairs ``(a[i], b[i])`` together (the same seed or the same
    interleaved round); otherwise ``a`` and ``b`` are resampled independently.
    """
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if paired:
        if x.shape != y.shape:
            raise ValueError(f"paired a and b must have the same length, got {x.size}, {y.size}")
        return bootstrap_ci(np.stack([x, y], axis=1),
                            lambda s: _safe_ratio(s[:, 0].mean(), s[:, 1].mean()), **kw)
    level = kw.get("level", LEVEL)
    n_boot, seed = kw.get("n_boot", N_BOOT), kw.get("seed", BOOT_SEED)
    _check_level(level, n_boot)
    n = min(x.size, y.size)
    if np.isnan(x).any() or np.isnan(y).any():
        return CI(*_NAN_CI, n)
    est = _safe_ratio(x.mean(), y.mean())
    if x.size == 1 and y.size == 1:
        return CI(est, est, est, n)
    rng = np.random.default_rng(seed)
    bx = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    by = y[rng.integers(0, y.size, size=(n_boot, y.size))].mean(axis=1)
    boots = np.array([_safe_ratio(p, q) for p, q in zip(bx, by)])
    return _percentile_ci(est, boots, n, level)


def _safe_ratio(p: float, q: float) -> float:
    return float(p) / float(q) if q != 0 else math.nan


# ------------------------------------------------------------------------------- slopes


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``; NaN when fewer than two points are
    positive and finite, or all ``x`` are equal (the one NaN rule every experiment uses)."""
    lx, ly = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if lx.shape != ly.shape:
        raise ValueError(f"x and y must have the same length, got {lx.size} and {ly.size}")
    ok = np.isfinite(lx) & np.isfinite(ly) & (lx > 0) & (ly > 0)
    if ok.sum() < 2 or np.ptp(np.log(lx[ok])) == 0:
        return math.nan
    return float(np.polyfit(np.log(lx[ok]), np.log(ly[ok]), 1)[0])


def theil_sen_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Median of the pairwise log-log slopes (robust to one outlying size)."""
    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    slopes = [(ly[j] - ly[i]) / (lx[j] - lx[i])
              for i in range(lx.size) for j in range(i + 1, lx.size) if lx[j] != lx[i]]
    slopes = [s for s in slopes if math.isfinite(s)]
    return float(np.median(slopes)) if slopes else math.nan


def _repeats_matrix(sizes: Sequence[float], repeats: Sequence[Sequence[float]]) -> list[np.ndarray]:
    xs = np.asarray(sizes, dtype=np.float64)
    if xs.ndim != 1 or xs.size < 2:
        raise ValueError(f"sizes must hold at least two sizes, got {list(np.atleast_1d(xs))}")
    rows = [np.asarray(r, dtype=np.float64).ravel() for r in repeats]
    if len(rows) != xs.size:
        raise ValueError(f"repeats must hold one sequence per size: {xs.size} sizes, "
                         f"{len(rows)} sequences")
    if any(r.size == 0 for r in rows):
        raise ValueError("every size needs at least one repeated measurement")
    return rows


def _bootstrap_slopes(sizes: Sequence[float], rows: list[np.ndarray], n_boot: int,
                      rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` log-log slopes, each refitted to medians of every size's repeats resampled
    with replacement (independently per size); NaN where a replicate cannot be fitted."""
    # Resampled medians, one column per size (vectorized: the bootstrap is 2000 refits).
    meds = np.stack([np.median(r[rng.integers(0, r.size, (n_boot, r.size))], axis=1)
                     for r in rows], axis=1)
    xs = np.asarray(sizes, dtype=np.float64)
    ok = np.isfinite(meds).all(axis=1) & (meds > 0).all(axis=1)
    if not (np.isfinite(xs).all() and (xs > 0).all()):
        ok[:] = False  # some sizes unusable: the scalar rule below drops them per row
    boots = np.full(n_boot, math.nan)
    if ok.any():
        lx = np.log(xs)
        ly = np.log(np.where(ok[:, None], meds, 1.0))
        xc = lx - lx.mean()
        if xc @ xc > 0:
            boots[ok] = ((ly - ly.mean(axis=1, keepdims=True)) @ xc / (xc @ xc))[ok]
    for b in np.flatnonzero(~ok):  # rows with a non-positive median: the scalar NaN rule
        boots[b] = loglog_slope(sizes, meds[b])
    return boots


def slope_ci(
    sizes: Sequence[float],
    repeats: Sequence[Sequence[float]],
    *,
    level: float = LEVEL,
    n_boot: int = 2_000,
    seed: int = BOOT_SEED,
) -> CI:
    """Log-log slope of cost vs size, from repeated measurements at each size.

    The estimate fits the per-size medians; the interval resamples each size's repeats with
    replacement (independently per size), takes medians and refits. A machine whose load moves
    during the run widens the interval instead of silently moving the slope.
    """
    _check_level(level, n_boot)
    rows = _repeats_matrix(sizes, repeats)
    if any(np.isnan(r).any() for r in rows):
        return CI(*_NAN_CI, len(rows))
    est = loglog_slope(sizes, [float(np.median(r)) for r in rows])
    if not math.isfinite(est):
        return CI(est, math.nan, math.nan, len(rows))
    rng = np.random.default_rng(seed)
    boots = _bootstrap_slopes(sizes, rows, n_boot, rng)
    return _percentile_ci(est, boots, len(rows), level)


def slope_diff_ci(
    sizes: Sequence[float],
    repeats_a: Sequence[Sequence[float]],
    repeats_b: Sequence[Sequence[float]],
    *,
    level: float = LEVEL,
    n_boot: int = 2_000,
    seed: int = BOOT_SEED,
) -> CI:
    """Log-log slope of ``a``'s cost minus ``b``'s (vs size), from repeats at each size: the
    estimate fits per-size medians; the interval resamples every size's repeats of both
    independently, as :func:`slope_ci` does, and refits both."""
    _check_level(level, n_boot)
    ra, rb = _repeats_matrix(sizes, repeats_a), _repeats_matrix(sizes, repeats_b)
    if any(np.isnan(r).any() for r in (*ra, *rb)):
        return CI(*_NAN_CI, len(ra))
    est = (loglog_slope(sizes, [float(np.median(r)) for r in ra])
           - loglog_slope(sizes, [float(np.median(r)) for r in rb]))
    if not math.isfinite(est):
        return CI(est, math.nan, math.nan, len(ra))
    rng = np.random.default_rng(seed)
    boots = _bootstrap_slopes(sizes, ra, n_boot, rng) - _bootstrap_slopes(sizes, rb, n_boot, rng)
    return _percentile_ci(est, boots, len(ra), level)


def cost_per_unit_ci(units: Sequence[float], repeats: Sequence[Sequence[float]],
                     **kw: Any) -> list[CI]:
    """Per size: the median of ``repeat / units`` (e.g. seconds per allowed pair) with its
    bootstrap interval, one :class:`CI` per size."""
    rows = _repeats_matrix(units, repeats)
    out = []
    for u, r in zip(units, rows):
        if not u > 0:
            raise ValueError(f"units must be positive, got {u}")
        out.append(bootstrap_ci(r / float(u), np.median, **kw))
    return out


# ------------------------------------------------------------------------------- seeds


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)


def over_seeds(fn: Callable[[int], T], seeds: Sequence[int], *,
               progress: Callable[..., Any] | None = None, desc: str = "seeds") -> list[T]:
    """``[fn(seed) for seed in seeds]``, seeding the global generators before each call.

    ``progress`` is e.g. ``ctx.progress`` (a tqdm bar over the seeds).
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty: an experiment needs at least one seed")
    it = progress(seeds, desc=desc, total=len(seeds)) if progress else iter(seeds)
    out = []
    for s in it:
        seed_everything(int(s))
        out.append(fn(int(s)))
    return out


def stack_metrics(per_seed: Sequence[Mapping[str, float]]) -> dict[str, np.ndarray]:
    """Per-seed dicts ``[{name: x}, ...]`` -> ``{name: array over seeds}`` (keys of the first
    dict; a key missing in a later one is NaN there)."""
    if not per_seed:
        return {}
    keys = list(per_seed[0])
    return {k: np.array([float(d.get(k, math.nan)) for d in per_seed]) for k in keys}


# ------------------------------------------------------------------------------- timing


def interleaved_times(
    cases: Mapping[K, Callable[[], Any]],
    *,
    repeat: int = 7,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[K, list[float]]:
    """Seconds of each case, measured in rounds A B C, A B C, ... so a change in the machine's
    load hits every case alike. Returns ``{case: [seconds per round]}``; take medians
    (``statistics.median``) or pass the lists to :func:`ratio_ci` (paired by round).

    ``clock`` is wall-clock time by default. ``time.process_time`` measures the CPU seconds
    this process spends instead: for single-threaded calls (:func:`single_thread`) that is
    their work, which other processes on a busy machine barely change, whereas the wall time
    grows with every process competing for the cores.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not cases:
        raise ValueError("cases is empty")
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    sync_device()
    times: dict[K, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            t0 = clock()
            fn()
            sync_device()
            times[name].append(clock() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def interleaved_min_times(
    cases: Mapping[K, Callable[[], Any]],
    *,
    repeat: int = 7,
    calls: int = 2,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[K, list[float]]:
    """:func:`interleaved_times` with ``calls`` interleaved calls per round, keeping each
    case's fastest call of the round: ``{case: [seconds per round]}``. Single calls have an
    upper tail (page faults on fresh buffers, interruptions) that a slope fitted over a few
    rounds turns into wide intervals; the fastest of two back-to-back rounds drops it."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    got = interleaved_times(cases, repeat=repeat * calls, warmup=warmup, clock=clock)
    return {k: [min(ts[i:i + calls]) for i in range(0, len(ts), calls)] for k, ts in got.items()}


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with torch using ``n`` intra-op threads; restores the old count."""
    import torch

    check_positive_int("threads: n", n)
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def single_thread() -> contextlib.AbstractContextManager[None]:
    """``threads(1)``: tiny models run faster and steadier on one thread of a shared CPU."""
    return threads(1)
