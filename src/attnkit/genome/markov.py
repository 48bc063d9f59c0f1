"""Order-k Markov baselines (k = 0..10) in bits per base, with additive smoothing.

Two scores in the same units:

* :meth:`MarkovModel.bits_per_base`: the usual left-to-right code length
  ``-log2 P(x_i | x_{i-k..i-1})``.
* :meth:`MarkovModel.masked_bits_per_base`: ``-log2 P(x_i | every other base)`` under the same
  chain, the exact conditional ``P(x_i | rest) ∝ prod_{j=i..i+k} P(x_j | x_{j-k..j-1})``. This is
  what a masked-base predictor estimates, so it is the fair baseline for one.

Positions whose context (or, for the masked score, the ``2k`` surrounding bases) holds ``N`` are
skipped, as are the first ``k`` (and last ``k``) positions of the scored sequence.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from torch import Tensor

from .fasta import N_TOKEN

__all__ = ["MarkovModel", "markov_baselines", "MAX_ORDER"]

MAX_ORDER = 10


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
        self.counts = np.zeros((4**order, 4), dtype=np.float64)
        self._log2p: np.ndarray | None = None

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
            ctx = self._contexts(arr)[ok]
            nxt = arr[k:][ok]
            np.add.at(self.counts, (ctx, nxt), 1.0)
        self._log2p = None
        return self

    @property
    def log2p(self) -> np.ndarray:
        """``(4**k, 4)`` smoothed ``log2 P(base | context)``."""
        if self._log2p is None:
            c = self.counts + self.alpha
            self._log2p = np.log2(c / c.sum(1, keepdims=True))
        return self._log2p

    def log2_prob(self, tokens: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(log2 P(x_j | context) for j = k..L-1, valid mask)``; invalid entries are 0."""
        arr = _as_array(tokens)
        k = self.order
        if arr.size <= k:
            return np.zeros(0), np.zeros(0, dtype=bool)
        ok = _window_clean(arr, k + 1)
        lp = self.log2p[self._contexts(arr), np.minimum(arr[k:], 3)]
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
        lp_table = self.log2p
        base = np.minimum(arr, 3)
        ctx_all = np.zeros(n, dtype=np.int64)  # ctx(j) for every j >= k, 0 before
        ctx_all[k:] = self._contexts(arr)
        centers = np.arange(k, n - k)
        ok = _window_clean(arr, 2 * k + 1)
        # score[b, i]: log2 of the joint terms touching x_i when x_i is replaced by b.
        score = np.zeros((4, centers.size))
        for b in range(4):
            score[b] += lp_table[ctx_all[centers], b]
            for m in range(1, k + 1):
                j = centers + m
                shifted = ctx_all[j] + (b - base[centers]) * 4 ** (m - 1)
                score[b] += lp_table[shifted, base[j]]
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

