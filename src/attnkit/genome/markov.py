"""Order-k Markov baselines (k = 0..12) in bits per base, with additive smoothing.

Two scores in the same units:

* :meth:`MarkovModel.bits_per_base`: the usual left-to-right code length
  ``-log2 P(x_i | x_{i-k..i-1})``.
* :meth:`MarkovModel.masked_bits_per_base`: ``-log2 P(x_i | every other base)`` under the same
  chain, the exact conditional ``P(x_i | rest) ∝ prod_{j=i..i+k} P(x_j | x_{j-k..j-1})``. This is
  what a masked-base predictor estimates, so it is the fair baseline for one.

Positions whose context (or, for the masked score, the ``2k`` surrounding bases) holds ``N`` are
skipped, as are the first ``k`` (and last ``k``) positions of the scored sequence.

Counts are kept only for the contexts seen (sorted context ids and their ``(n, 4)`` counts), so
order 12 (16.7 million possible contexts) costs memory in proportion to the training sequence;
an unseen context predicts the smoothed uniform distribution.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from torch import Tensor

from .fasta import N_TOKEN

__all__ = ["MarkovModel", "markov_baselines", "select_markov", "MAX_ORDER"]

MAX_ORDER = 12


def _as_array(tokens: Tensor | np.ndarray, name: str = "tokens") -> np.ndarray:
    arr = tokens.cpu().numpy() if isinstance(tokens, Tensor) else np.asarray(tokens)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer sequence of tokens, got {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > N_TOKEN):
        raise ValueError(f"{name} must hold tokens 0..3 (bases) or 4 (N)")
    return arr.astype(np.int64)


def _window_clean(arr: np.ndarray, width: int) -> np.ndarray:
    """``ok[s]`` is True when ``arr[s : s + width]`` holds no N (``len(arr) - width + 1``)."""
    bad = np.concatenate([[0], np.cumsum(arr == N_TOKEN)])
    return (bad[width:] - bad[:-width]) == 0


class MarkovModel:
    """Order-``k`` Markov chain over A, C, G, T with additive (Dirichlet ``alpha``) smoothing.

    Contexts are numbered little-endian: the base just before position ``j`` is the lowest
    base-4 digit of ``ctx(j) = sum_{r=1..k} x[j-r] * 4**(r-1)``.
    """

    def __init__(self, order: int, alpha: float = 0.5):
        if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= MAX_ORDER:
            raise ValueError(f"order must be an int in [0, {MAX_ORDER}], got {order!r}")
        if (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0
                or not math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite float > 0, got {alpha!r}")
        self.order, self.alpha = order, float(alpha)
        self._codes: list[np.ndarray] = []  # ctx * 4 + next base, one array per fit() call
        self._table: tuple[np.ndarray, np.ndarray] | None = None

    def _contexts(self, arr: np.ndarray) -> np.ndarray:
        """``ctx(j)`` for ``j = k .. n-1`` (N tokens give garbage ids: filter with a mask)."""
        k, n = self.order, arr.size
        ctx = np.zeros(n - k, dtype=np.int64)
        for r in range(1, k + 1):
            ctx += np.minimum(arr[k - r : n - r], 3) * 4 ** (r - 1)
        return ctx

    def fit(self, tokens: Tensor | np.ndarray) -> MarkovModel:
        """Add the transition counts of ``tokens (L,)`` (may be called on several records)."""
        arr = _as_array(tokens)
        k = self.order
        if arr.size > k:
            ok = _window_clean(arr, k + 1)
            self._codes.append(self._contexts(arr)[ok] * 4 + arr[k:][ok])
        self._table = None
        return self

    def _lookup(self) -> tuple[np.ndarray, np.ndarray]:
        """``(keys (n,), log2p (n + 1, 4))``: the seen contexts, sorted, and their smoothed
        ``log2 P(base | context)``; row ``n`` is the unseen-context (uniform) row."""
        if self._table is None:
            codes = np.concatenate(self._codes) if self._codes else np.zeros(0, np.int64)
            uniq, cnt = np.unique(codes, return_counts=True)
            keys, inv = np.unique(uniq // 4, return_inverse=True)
            counts = np.zeros((keys.size + 1, 4))
            counts[inv, uniq % 4] = cnt
            c = counts + self.alpha
            self._table = keys, np.log2(c / c.sum(1, keepdims=True))
        return self._table

    def _log2p_at(self, ctx: np.ndarray, base: np.ndarray | int) -> np.ndarray:
        """``log2 P(base | ctx)`` elementwise (unseen contexts: uniform)."""
        keys, table = self._lookup()
        row = np.searchsorted(keys, ctx)
        row = np.where((row < keys.size) & (keys[np.minimum(row, max(keys.size - 1, 0))] == ctx)
                       if keys.size else np.zeros(ctx.shape, bool), row, keys.size)
        return table[row, base]

    @property
    def counts(self) -> np.ndarray:
        """``(4**k, 4)`` dense transition counts (for small orders; memory ``4**(k+1)``)."""
        keys, _ = self._lookup()
        codes = np.concatenate(self._codes) if self._codes else np.zeros(0, np.int64)
        return np.bincount(codes, minlength=4 ** (self.order + 1)).reshape(-1, 4).astype(float)

    @property
    def log2p(self) -> np.ndarray:
        """``(4**k, 4)`` smoothed ``log2 P(base | context)`` (dense; for small orders)."""
        ctx = np.repeat(np.arange(4**self.order), 4)
        return self._log2p_at(ctx, np.tile(np.arange(4), 4**self.order)).reshape(-1, 4)

    def log2_prob(self, tokens: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(log2 P(x_j | context) for j = k..L-1, valid mask)``; invalid entries are 0."""
        arr = _as_array(tokens)
        k = self.order
        if arr.size <= k:
            return np.zeros(0), np.zeros(0, dtype=bool)
        ok = _window_clean(arr, k + 1)
        lp = self._log2p_at(self._contexts(arr), np.minimum(arr[k:], 3))
        return np.where(ok, lp, 0.0), ok

    def bits_per_base(self, tokens: Tensor | np.ndarray) -> float:
        """Mean ``-log2 P(x_i | previous k bases)`` over scorable positions."""
        lp, ok = self.log2_prob(tokens)
        if not ok.any():
            raise ValueError(f"no position of tokens has a clean order-{self.order} context")
        return float(-lp[ok].mean())

    def masked_bits_per_base(self, tokens: Tensor | np.ndarray) -> float:
        """Mean ``-log2 P(x_i | all other bases)`` over positions ``i`` with ``k`` clean bases
        on each side."""
        arr = _as_array(tokens)
        k, n = self.order, arr.size
        if n < 2 * k + 1:
            raise ValueError(f"tokens must hold at least {2 * k + 1} bases for order {k}")
        base = np.minimum(arr, 3)
        ctx_all = np.zeros(n, dtype=np.int64)  # ctx(j) for every j >= k, 0 before
        ctx_all[k:] = self._contexts(arr)
        centers = np.arange(k, n - k)
        ok = _window_clean(arr, 2 * k + 1)
        # score[b, i]: log2 of the joint terms touching x_i when x_i is replaced by b.
        score = np.zeros((4, centers.size))
        for b in range(4):
            score[b] += self._log2p_at(ctx_all[centers], b)
            for m in range(1, k + 1):
                j = centers + m
                shifted = ctx_all[j] + (b - base[centers]) * 4 ** (m - 1)
                score[b] += self._log2p_at(shifted, base[j])
        mx = score.max(0)
        log2_norm = mx + np.log2(np.exp2(score - mx).sum(0))
        lp_true = score[base[centers], np.arange(centers.size)] - log2_norm
        if not ok.any():
            raise ValueError(f"no position of tokens has {k} clean bases on each side")
        return float(-lp_true[ok].mean())


def markov_baselines(
    train: Tensor | np.ndarray | Iterable[Tensor],
    test: Tensor | np.ndarray,
    orders: Iterable[int] = range(MAX_ORDER + 1),
    alpha: float = 0.5,
) -> list[dict[str, float]]:
    """Fit order-k chains on ``train`` (one sequence or several) and score ``test``.

    Returns rows ``{"order", "bits_per_base", "masked_bits_per_base"}``.
    """
    parts = [train] if isinstance(train, (Tensor, np.ndarray)) else list(train)
    rows = []
    for k in orders:
        m = MarkovModel(k, alpha)
        for part in parts:
            m.fit(part)
        rows.append({"order": k, "bits_per_base": m.bits_per_base(test),
                     "masked_bits_per_base": m.masked_bits_per_base(test)})
    return rows



def select_markov(
    train: Tensor | np.ndarray,
    valid: Tensor | np.ndarray,
    test: Tensor | np.ndarray,
    orders: Iterable[int] = range(1, MAX_ORDER + 1),
    alpha: float = 0.5,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The Markov baseline chosen the honest way: every order is fit on ``train`` and scored
    (masked bits per base) on ``valid``; the best order is refit on ``train + valid`` and
    scored once on ``test``.

    Returns ``(best, rows)``: ``best = {"order", "valid_masked_bits_per_base",
    "masked_bits_per_base", "bits_per_base"}`` (the last two on ``test``) and one row per order
    with its validation score.
    """
    rows = []
    for k in orders:
        m = MarkovModel(k, alpha).fit(train)
        rows.append({"order": k, "valid_masked_bits_per_base": m.masked_bits_per_base(valid)})
    pick = min(rows, key=lambda r: r["valid_masked_bits_per_base"])
    best = MarkovModel(int(pick["order"]), alpha).fit(train).fit(valid)
    return ({**pick, "masked_bits_per_base": best.masked_bits_per_base(test),
             "bits_per_base": best.bits_per_base(test)}, rows)
