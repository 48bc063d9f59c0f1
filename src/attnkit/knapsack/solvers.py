"""Exact and greedy 0-1 knapsack solvers (the baselines the attention heuristic is measured
against)."""

from __future__ import annotations

import numpy as np

from .instances import check_instance

__all__ = [
    "solve_exact",
    "greedy_fill",
    "greedy_ratio",
    "greedy_value",
    "greedy_weight",
    "total",
]


def total(values, items) -> int | float:
    """Sum of ``values`` over the chosen ``items`` (indices)."""
    items = np.asarray(items, dtype=np.int64)
    return np.asarray(values)[items].sum().item() if items.size else 0


def solve_exact(weights, values, capacity, method: str = "auto") -> tuple[int, np.ndarray]:
    """Optimal 0-1 knapsack: ``(best value, chosen indices (k,))``.

    ``method="dp"``: dynamic programming over capacities, vectorized with numpy over the
    capacity axis (``O(n * C)`` time; the choice bits are kept packed, ``n * C / 8`` bytes, to
    recover the items). ``"ortools"``: Google OR-Tools' branch-and-bound knapsack solver (raises
    ``ImportError`` when it is not installed). ``"auto"``: OR-Tools when installed, else DP.
    Weights and capacity must be integers.
    """
    w, v, capacity = check_instance(weights, values, capacity)
    if w.dtype.kind == "f" or v.dtype.kind == "f" or float(capacity) != int(capacity):
        raise TypeError("solve_exact needs integer weights, values and capacity")
    capacity = int(capacity)
    if method not in ("auto", "dp", "ortools"):
        raise ValueError(f"method must be 'auto', 'dp' or 'ortools', got {method!r}")
    if method in ("auto", "ortools"):
        try:
            return _solve_ortools(w, v, capacity)
        except ImportError:
            if method == "ortools":
                raise
    return _solve_dp(w.astype(np.int64), v.astype(np.int64), capacity)


def _solve_dp(w: np.ndarray, v: np.ndarray, capacity: int) -> tuple[int, np.ndarray]:
    n = w.shape[0]
    cap = min(capacity, int(w.sum()))
    # best[c] = best value with total weight <= c using the items seen so far
    best = np.zeros(cap + 1, dtype=np.int64)
    taken = []  # packed bits: did item i improve best[c]?
    for i in range(n):
        wi = int(w[i])
        if wi > cap:
            taken.append(None)
            continue
        cand = best[: cap + 1 - wi] + v[i]
        better = cand > best[wi:]
        best[wi:] = np.where(better, cand, best[wi:])
        row = np.zeros(cap + 1, dtype=bool)
        row[wi:] = better
        taken.append(np.packbits(row))
    items = []
    c = cap
    for i in range(n - 1, -1, -1):
        bits = taken[i]
        if bits is not None and (bits[c >> 3] >> (7 - (c & 7))) & 1:
            items.append(i)
            c -= int(w[i])
    return int(best[cap]), np.array(sorted(items), dtype=np.int64)


def _solve_ortools(w: np.ndarray, v: np.ndarray, capacity: int) -> tuple[int, np.ndarray]:
    from ortools.algorithms.python import knapsack_solver  # optional dependency

    solver = knapsack_solver.KnapsackSolver(
        knapsack_solver.SolverType.KNAPSACK_MULTIDIMENSION_BRANCH_AND_BOUND_SOLVER, "attnkit"
    )
    solver.init(v.astype(int).tolist(), [w.astype(int).tolist()], [capacity])
    value = int(solver.solve())
    items = np.array([i for i in range(len(w)) if solver.best_solution_contains(i)], np.int64)
    return value, items


def greedy_fill(weights, capacity, order) -> np.ndarray:
    """Take items in ``order`` whenever they still fit, scanning to the end (the "fill" rule:
    an item that does not fit is skipped, not a stopping point). Returns sorted indices."""
    w = np.asarray(weights)
    room = capacity
    chosen = []
    for i in np.asarray(order).tolist():
        wi = w[i]
        if wi <= room:
            chosen.append(i)
            room -= wi
    return np.array(sorted(chosen), dtype=np.int64)


def greedy_ratio(weights, values, capacity) -> np.ndarray:
    """Greedy by value/weight, descending, with fill. Returns chosen indices."""
    w, v, capacity = check_instance(weights, values, capacity)
    order = np.argsort(-(v / w), kind="stable")
    return greedy_fill(w, capacity, order)


def greedy_value(weights, values, capacity) -> np.ndarray:
    """Greedy by value alone (most valuable first), with fill."""
    w, v, capacity = check_instance(weights, values, capacity)
    return greedy_fill(w, capacity, np.argsort(-v, kind="stable"))


def greedy_weight(weights, values, capacity) -> np.ndarray:
    """Greedy by weight alone (lightest first), with fill."""
    w, v, capacity = check_instance(weights, values, capacity)
    return greedy_fill(w, capacity, np.argsort(w, kind="stable"))
