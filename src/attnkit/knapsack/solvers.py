"""Exact and greedy 0-1 knapsack solvers (the baselines the attention heuristic is measured
against)."""

from __future__ import annotations

import numpy as np

from .instances import check_instance

__all__ = [
    "solve_exact",
    "optimum_value",
    "greedy_fill",
    "greedy_fill_batch",
    "greedy_ratio",
    "greedy_ratio_best_item",
    "greedy_random",
    "greedy_value",
    "greedy_weight",
    "with_best_item",
    "total",
]


def total(values, items) -> int | float:
    """Sum of ``values`` over the chosen ``items`` (indices)."""
    items = np.asarray(items, dtype=np.int64)
    return np.asarray(values)[items].sum().item() if items.size else 0


def _integer_instance(weights, values, capacity) -> tuple[np.ndarray, np.ndarray, int]:
    w, v, capacity = check_instance(weights, values, capacity)
    if w.dtype.kind == "f" or v.dtype.kind == "f" or float(capacity) != int(capacity):
        raise TypeError("solve_exact needs integer weights, values and capacity")
    return w.astype(np.int64), v.astype(np.int64), int(capacity)


def solve_exact(weights, values, capacity, method: str = "auto") -> tuple[int, np.ndarray]:
    """Optimal 0-1 knapsack: ``(best value, chosen indices (k,))``.

    ``method="dp"``: dynamic programming over capacities, vectorized with numpy over the
    capacity axis (``O(n * C)`` time; the choice bits are kept packed, ``n * C / 8`` bytes, to
    recover the items). ``"ortools"``: Google OR-Tools' branch-and-bound knapsack solver (raises
    ``ImportError`` when it is not installed). ``"auto"``: OR-Tools when installed, else DP.
    Weights and capacity must be integers. For the optimal *value* alone,
    :func:`optimum_value` is much faster.
    """
    if method not in ("auto", "dp", "ortools"):
        raise ValueError(f"method must be 'auto', 'dp' or 'ortools', got {method!r}")
    w, v, capacity = _integer_instance(weights, values, capacity)
    if method in ("auto", "ortools"):
        try:
            return _solve_ortools(w, v, capacity)
        except ImportError:
            if method == "ortools":
                raise
    return _solve_dp(w, v, capacity)


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


def optimum_value(weights, values, capacity) -> int:
    """The optimal value of a 0-1 knapsack (integer data), exactly.

    Dembo-Hammer reduction, then a value-only DP on what is left. With items sorted by
    value/weight, ``b`` the break item (the first that no longer fits) and ``z`` the greedy
    prefix's LP bound, forcing item ``j`` against its LP value costs at least
    ``|v_j - w_j v_b / w_b|``, so every solution that flips ``j`` is worth at most
    ``z - |v_j - w_j v_b / w_b|``; when that is below ``LB + 1`` (``LB`` = the greedy fill's
    value) ``j`` is fixed. The DP over the free items then only visits capacities that can still
    matter (between ``c - (weight of the items still to come)`` and ``(weight seen so far)``).
    The result is ``max(DP, LB)``: exact, because any solution the reduction cut off is worth at
    most ``LB``.
    """
    w, v, c = _integer_instance(weights, values, capacity)
    fit = w <= c
    w, v = w[fit], v[fit]
    if w.sum() <= c:
        return int(v.sum())
    order = np.lexsort((w, -v * 1.0 / w))  # ratio descending (ties: lighter first)
    w, v = w[order], v[order]
    cw = np.cumsum(w)
    b = int(np.searchsorted(cw, c, side="right"))  # first item whose prefix exceeds c
    w_pre, v_pre = (int(cw[b - 1]), int(v[:b].sum())) if b else (0, 0)
    wb, vb = int(w[b]), int(v[b])
    lb = int(v[greedy_fill(w, c, np.arange(w.size))].sum())
    # everything below is multiplied by wb to stay in exact integers
    z_lp = wb * v_pre + (c - w_pre) * vb
    cost = np.abs(v * wb - vb * w)
    fixed = z_lp - cost < wb * (lb + 1)
    fixed[b] = False  # the break item's cost is 0 by definition: never fixed
    pos = np.arange(w.size)
    fixed_in = fixed & (pos < b)
    free = ~fixed
    c_rest = c - int(w[fixed_in].sum())
    base = int(v[fixed_in].sum())
    fw, fv = w[free], v[free]
    keep = fw <= c_rest
    fw, fv = fw[keep], fv[keep]
    if c_rest < 0:  # cannot happen (the fixed-in items are a greedy prefix); kept exact anyway
        return lb
    return max(lb, base + _dp_value(fw, fv, c_rest))


def _dp_value(w: np.ndarray, v: np.ndarray, cap: int) -> int:
    """Value-only DP over capacities ``0..cap`` (int64), visiting only the capacities that can
    still reach ``cap``."""
    if w.size == 0 or cap <= 0:
        return 0
    if int(w.sum()) <= cap:
        return int(v.sum())
    best = np.zeros(cap + 1, dtype=np.int64)
    seen, seen_value, rest = 0, 0, int(w.sum())
    for wi, vi in zip(w.tolist(), v.tolist()):
        rest -= wi
        hi = min(cap, seen + wi)
        if hi > seen:  # capacities above the weight seen so far: everything seen fits
            best[max(seen + 1, 0):hi + 1] = seen_value
        lo = max(wi, cap - rest)  # capacities below cap - rest can no longer reach cap
        seen, seen_value = seen + wi, seen_value + vi
        if lo > hi:
            continue
        cand = best[lo - wi:hi - wi + 1] + vi
        np.maximum(best[lo:hi + 1], cand, out=best[lo:hi + 1])
    return int(best[cap])


def _solve_ortools(w: np.ndarray, v: np.ndarray, capacity: int) -> tuple[int, np.ndarray]:
    from ortools.algorithms.python import knapsack_solver  # optional dependency

    solver = knapsack_solver.KnapsackSolver(
        knapsack_solver.SolverType.KNAPSACK_MULTIDIMENSION_BRANCH_AND_BOUND_SOLVER, "attnkit"
    )
    solver.init(v.astype(int).tolist(), [w.astype(int).tolist()], [capacity])
    value = int(solver.solve())
    items = np.array([i for i in range(len(w)) if solver.best_solution_contains(i)], np.int64)
    return value, items


def greedy_fill_batch(sorted_weights: np.ndarray, capacities: np.ndarray,
                      valid: np.ndarray | None = None) -> np.ndarray:
    """The greedy fill of many rows at once: ``sorted_weights (R, n)`` in the order items are
    offered, ``capacities (R,)``, ``valid (R, n)`` bool (False: never take). Returns the
    ``(R, n)`` bool mask of taken items (in the same sorted order).

    Scanning items in order and taking each that still fits is sequential, but it decides in
    rounds: among the undecided items that fit the room left, every item whose running weight
    (over those items) fits is taken, exactly as the scan would; the first one that does not
    fit is then heavier than the new room and drops out with every other too-heavy item. Each
    round takes at least one item per unfinished row.
    """
    ws = np.asarray(sorted_weights, dtype=np.float64 if sorted_weights.dtype.kind == "f"
                    else np.int64)
    room = np.array(capacities, dtype=ws.dtype).reshape(-1).copy()
    undecided = np.ones(ws.shape, bool) if valid is None else np.array(valid, bool)
    taken = np.zeros(ws.shape, bool)
    active = np.arange(ws.shape[0])
    while active.size:
        wa, ra = ws[active], room[active]
        und = undecided[active] & (wa <= ra[:, None])  # too heavy now: too heavy forever
        run = np.cumsum(np.where(und, wa, 0), axis=1)
        take = und & (run <= ra[:, None])
        room[active] = ra - np.where(take, wa, 0).sum(1)
        taken[active] |= take
        undecided[active] = und & ~take
        active = active[undecided[active].any(1)]
    return taken


def greedy_fill(weights, capacity, order) -> np.ndarray:
    """Take items in ``order`` whenever they still fit, scanning to the end (the "fill" rule:
    an item that does not fit is skipped, not a stopping point). Returns sorted indices."""
    w = np.asarray(weights)
    order = np.asarray(order, dtype=np.int64)
    if order.size == 0:
        return np.zeros(0, np.int64)
    taken = greedy_fill_batch(w[order][None], np.array([capacity]))[0]
    return np.sort(order[taken])


def with_best_item(weights, values, capacity, items) -> np.ndarray:
    """``items`` or the single most valuable item that fits, whichever is worth more (the fix
    that makes the ratio rule a 1/2-approximation; it never makes a solution worse)."""
    w, v, capacity = check_instance(weights, values, capacity)
    items = np.asarray(items, dtype=np.int64)
    fits = np.flatnonzero(w <= capacity)
    if fits.size == 0:
        return items
    j = int(fits[np.argmax(v[fits])])
    return np.array([j], np.int64) if v[j] > v[items].sum() else items


def greedy_ratio(weights, values, capacity) -> np.ndarray:
    """Greedy by value/weight, descending, with fill. Returns chosen indices."""
    w, v, capacity = check_instance(weights, values, capacity)
    order = np.argsort(-(v / w), kind="stable")
    return greedy_fill(w, capacity, order)


def greedy_ratio_best_item(weights, values, capacity) -> np.ndarray:
    """The classic 1/2-approximation: the ratio rule's fill or the best single item."""
    return with_best_item(weights, values, capacity, greedy_ratio(weights, values, capacity))


def greedy_random(weights, values, capacity, seed: int | None = None) -> np.ndarray:
    """Fill in a random order (the no-information baseline)."""
    w, v, capacity = check_instance(weights, values, capacity)
    return greedy_fill(w, capacity, np.random.default_rng(seed).permutation(w.size))


def greedy_value(weights, values, capacity) -> np.ndarray:
    """Greedy by value alone (most valuable first), with fill."""
    w, v, capacity = check_instance(weights, values, capacity)
    return greedy_fill(w, capacity, np.argsort(-v, kind="stable"))


def greedy_weight(weights, values, capacity) -> np.ndarray:
    """Greedy by weight alone (lightest first), with fill."""
    w, v, capacity = check_instance(weights, values, capacity)
    return greedy_fill(w, capacity, np.argsort(w, kind="stable"))
