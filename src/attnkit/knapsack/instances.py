"""Pisinger's classic 0-1 knapsack instance classes.

Reference: D. Pisinger, "Where are the hard knapsack problems?", Computers & Operations
Research 32 (2005). Weights are uniform integers in ``[1, R]``; profits depend on the class:

- ``uncorrelated``: ``v`` uniform in ``[1, R]``.
- ``weakly_correlated``: ``v`` uniform in ``[w - R/10, w + R/10]``, kept ``>= 1``.
- ``strongly_correlated``: ``v = w + R/10``.
- ``inverse_strongly_correlated``: ``v`` uniform in ``[1, R]``, ``w = v + R/10``.
- ``almost_strongly_correlated``: ``v`` uniform in ``[w + R/10 - R/500, w + R/10 + R/500]``.
- ``subset_sum``: ``v = w``.

The capacity is a fraction of the total weight (default one half); Pisinger's series uses
``c = h / (H + 1) * sum(w)`` for ``h = 1..H`` (:func:`pisinger_capacity_fraction`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..checks import check_positive_int

__all__ = [
    "CLASSES", "KnapsackInstance", "generate", "check_instance", "pisinger_capacity_fraction",
]

CLASSES: tuple[str, ...] = (
    "uncorrelated",
    "weakly_correlated",
    "strongly_correlated",
    "inverse_strongly_correlated",
    "almost_strongly_correlated",
    "subset_sum",
)


@dataclass(frozen=True)
class KnapsackInstance:
    """One 0-1 knapsack instance: ``weights (n,)``, ``values (n,)`` positive int64, capacity."""

    weights: np.ndarray
    values: np.ndarray
    capacity: int
    kind: str = ""

    def __iter__(self):  # allows ``w, v, c = instance``
        return iter((self.weights, self.values, self.capacity))

    @property
    def n(self) -> int:
        return int(self.weights.shape[0])


def generate(
    n: int, kind: str, R: int = 1000, seed: int | None = None, capacity_fraction: float = 0.5
) -> KnapsackInstance:
    """One instance of Pisinger class ``kind`` with ``n`` items and data range ``R``.

    Args:
        n: number of items (>= 1).
        kind: one of :data:`CLASSES`.
        R: weights are integers in ``[1, R]`` (``R >= 10`` so that ``R/10 >= 1``).
        seed: random seed.
        capacity_fraction: capacity as a fraction of the total weight, in ``(0, 1)``.
    """
    check_positive_int("n", n)
    if kind not in CLASSES:
        raise ValueError(f"kind must be one of {CLASSES}, got {kind!r}")
    if not isinstance(R, (int, np.integer)) or R < 10:
        raise ValueError(f"R must be an int >= 10, got {R!r}")
    if not 0.0 < capacity_fraction < 1.0:
        raise ValueError(f"capacity_fraction must be in (0, 1), got {capacity_fraction}")
    rng = np.random.default_rng(seed)
    r10, r500 = R // 10, max(R // 500, 1)
    w = rng.integers(1, R + 1, size=n)
    if kind == "uncorrelated":
        v = rng.integers(1, R + 1, size=n)
    elif kind == "weakly_correlated":
        v = np.maximum(w + rng.integers(-r10, r10 + 1, size=n), 1)
    elif kind == "strongly_correlated":
        v = w + r10
    elif kind == "inverse_strongly_correlated":
        v = rng.integers(1, R + 1, size=n)
        w = v + r10
    elif kind == "almost_strongly_correlated":
        v = w + r10 + rng.integers(-r500, r500 + 1, size=n)
    else:  # subset_sum
        v = w.copy()
    capacity = max(int(capacity_fraction * int(w.sum())), 1)
    return KnapsackInstance(w.astype(np.int64), v.astype(np.int64), capacity, kind)


def pisinger_capacity_fraction(h: int, H: int = 100) -> float:
    """Pisinger's (2005) capacity series: instance ``h`` of ``H`` gets
    ``c = h / (H + 1) * sum(w)``; this returns ``h / (H + 1)``."""
    if isinstance(H, bool) or not isinstance(H, (int, np.integer)) or H < 1:
        raise ValueError(f"H must be an int >= 1, got {H!r}")
    if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or not 1 <= h <= H:
        raise ValueError(f"h must be an int in [1, H={H}], got {h!r}")
    return h / (H + 1)


def check_instance(weights, values, capacity) -> tuple[np.ndarray, np.ndarray, int | float]:
    """Validate and convert: positive finite ``weights (n,)``, non-negative finite
    ``values (n,)`` (n >= 1) and a positive finite ``capacity``. Each ``ValueError`` names the
    argument at fault. Items heavier than the capacity are allowed (every solver skips them).

    Weights must be integers for the exact solver; heuristics accept positive floats too.
    """
    w = np.asarray(weights)
    v = np.asarray(values)
    if w.ndim != 1 or v.ndim != 1 or w.shape != v.shape:
        raise ValueError(
            f"weights and values must be 1-D arrays of one length n, got shapes {w.shape} and "
            f"{v.shape}"
        )
    if w.size == 0:
        raise ValueError("weights and values are empty: a knapsack instance needs n >= 1 items")
    for name, a in (("weights", w), ("values", v)):
        if a.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be numeric, got dtype {a.dtype}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if (w <= 0).any():
        raise ValueError("weights must all be > 0 (zero or negative weights are not allowed)")
    if (v < 0).any():
        raise ValueError("values must all be >= 0")
    if isinstance(capacity, (bool, np.bool_)) or not isinstance(
        capacity, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"capacity must be a number, got {type(capacity).__name__}")
    if not np.isfinite(capacity) or capacity <= 0:
        raise ValueError(f"capacity must be a finite number > 0, got {capacity}")
    return w, v, capacity
