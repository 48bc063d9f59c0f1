"""Knapsack by attention: two heads over item tokens, multiplied, then greedy fill.

Each item is a token whose key holds its features ``[w/w_max, v/v_max, (v/w)/max(v/w)]``;
a "null item" token (all-zero key: no weight, no value) is appended as the reference for "do
not take". Two query heads read the items:

- head 1, the *weight watcher*, query ``[-1, 0, 0]`` at temperature ``t1``: logits
  ``-w/(w_max t1)``, attends to light items;
- head 2, the *value seeker*, query ``[0, 1, 0]`` at temperature ``t2``: logits
  ``v/(v_max t2)``, attends to valuable items.

The product of the two softmaxes is ``∝ exp(v/(v_max t2) - w/(w_max t1))``, so it ranks items by
``v - λ w`` with ``λ = (v_max t2) / (w_max t1)``: the temperature ratio is a Lagrange multiplier
on the capacity. It is chosen per instance: bisection on ``μ = t2/t1`` finds the multiplier at
which the items whose product beats the null item's just fit (the LP relaxation's dual), then a
few multipliers around it are tried and the best feasible greedy fill is kept. The greedy fill
scans all items in product order and skips those that no longer fit.

The learned variant keeps the mechanism and learns the two queries by gradient descent on
training instances (logistic loss of each item's log-product against its membership in the
optimal set, with the per-instance multiplier from the same bisection).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..distributed.data_parallel import ApplyModule, all_reduce_mean, rescale_mean, shard, wrap_ddp
from ..functional import attention
from .instances import KnapsackInstance, check_instance
from .solvers import greedy_fill_batch, solve_exact

__all__ = ["AttentionKnapsack", "KnapsackAttentionResult", "item_features"]

NUM_FEATURES = 3
# Largest inverse temperature: keeps every log-weight above ~-2*_MAX_INV_T (no underflow).
_MAX_INV_T = 30.0


def item_features(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``(n, 3)`` item features ``[w/w_max, v/v_max, (v/w)/max(v/w)]`` (float64)."""
    w = np.asarray(weights, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    ratio = v / w
    vmax = v.max() if v.size and v.max() > 0 else 1.0
    rmax = ratio.max() if ratio.size and ratio.max() > 0 else 1.0
    return np.stack([w / w.max(), v / vmax, ratio / rmax], axis=1) if w.size else np.zeros((0, 3))


@dataclass
class KnapsackAttentionResult:
    """What :meth:`AttentionKnapsack.solve_detailed` found.

    ``items``: chosen indices; ``weight_head``/``value_head``: ``(n,)`` attention weights of the
    two heads over the items at the chosen temperatures (the null token's weight left out);
    ``product``: their product; ``multiplier``: the chosen ``μ = t2/t1``; ``temperatures``:
    ``(t1, t2)``.
    """

    items: np.ndarray
    value: float
    weight: float
    weight_head: np.ndarray
    value_head: np.ndarray
    product: np.ndarray
    multiplier: float
    temperatures: tuple[float, float]


@contextmanager
def _single_thread():
    """The heads are tiny (2 x n) products: on a busy machine intra-op threads only add
    synchronisation cost (measured 40 ms vs 20 us per call), so run them on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _temperatures(mu: float) -> tuple[float, float]:
    """``(t1, t2)`` with ``t2/t1 = mu`` and the larger inverse temperature ``_MAX_INV_T``."""
    if mu <= 1.0:
        return 1.0 / (mu * _MAX_INV_T), 1.0 / _MAX_INV_T
    return 1.0 / _MAX_INV_T, mu / _MAX_INV_T


class AttentionKnapsack(torch.nn.Module):
    """The two-head attention heuristic for 0-1 knapsack.

    Args:
        num_candidates: multipliers tried around the bisected one (the best fill is kept).
        spread: the candidates span ``μ_c * exp([-spread, spread])``.
        bisection_steps: steps of the bisection on ``log μ``.
    """

    def __init__(self, num_candidates: int = 9, spread: float = 0.4, bisection_steps: int = 30):
        super().__init__()
        for name, val in (("num_candidates", num_candidates),
                          ("bisection_steps", bisection_steps)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        if (isinstance(spread, bool) or not isinstance(spread, (int, float))
                or not math.isfinite(spread) or spread < 0):
            raise ValueError(f"spread must be a finite float >= 0, got {spread!r}")
        self.num_candidates, self.spread = num_candidates, spread
        self.bisection_steps = bisection_steps
        designed = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
        #: ``(2, 3)`` head queries: row 0 the weight watcher, row 1 the value seeker.
        self.queries = torch.nn.Parameter(designed)
        self.learned = False

    # ------------------------------------------------------------------ heads
    def heads(self, features: torch.Tensor, mu: float, unit: bool = False) -> torch.Tensor:
        """Attention weights ``(2, n + 1)`` of the two heads over the items and the null token
        (last), at temperatures with ``t2/t1 = mu`` (or both 1 when ``unit``); computed by
        :func:`attnkit.attention`.

        ``features``: ``(n, 3)`` float64 item features.
        """
        n = features.shape[0]
        keys = torch.cat([features, features.new_zeros(1, NUM_FEATURES)]).view(1, 1, n + 1, -1)
        q = self.queries.view(1, 2, 1, NUM_FEATURES)
        t1, t2 = (1.0, 1.0) if unit else _temperatures(mu)
        temperature = torch.tensor([t1, t2], dtype=torch.float64)
        values = keys.new_zeros(1, 1, n + 1, 1)  # only the weights are used
        _, weights = attention(q, keys, values, scale=1.0, temperature=temperature,
                               return_weights=True)
        return weights[0, :, 0, :]

    def _bisect(self, features: torch.Tensor, w: np.ndarray, capacity: float) -> float:
        """Smallest ``μ = t2/t1`` (log-bisection in [1e-4, 1e4]) at which the items whose
        product beats the null token's just fit.

        One engine call at unit temperatures gives each head's logits relative to the null
        token, ``s_h``; at temperatures ``(t1, t2)`` the log-product relative to the null token is
        exactly ``s_1/t1 + s_2/t2``, so the bisection needs no further attention call.
        """
        with torch.no_grad():
            logw = torch.log(self.heads(features, 1.0, unit=True))
        s1, s2 = (logw[:, :-1] - logw[:, -1:]).numpy()

        def fits(log_mu: float) -> bool:
            t1, t2 = _temperatures(float(np.exp(log_mu)))
            return w[s1 / t1 + s2 / t2 > 0].sum() <= capacity

        lo, hi = np.log(1e-4), np.log(1e4)
        if fits(lo):
            return float(np.exp(lo))
        for _ in range(self.bisection_steps):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return float(np.exp(hi))

    # ------------------------------------------------------------------ solve
    def _head_logits(self, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """One engine call at unit temperatures for a batch: ``features (B, n, 3)`` ->
        ``(s1, s2)``, each ``(B, n)``: every head's log-weight of each item relative to the null
        token. At temperatures ``(t1, t2)`` with ``t2/t1 = μ`` the log-product relative to the
        null token is exactly ``s1/t1 + s2/t2``, a positive multiple of ``μ s1 + s2`` (see
        :func:`_temperatures`), so ranking and sign at any ``μ`` need no further attention
        call."""
        B, n, _ = features.shape
        keys = torch.cat([features, features.new_zeros(B, 1, NUM_FEATURES)], 1).view(
            B, 1, n + 1, NUM_FEATURES)
        q = self.queries.view(1, 2, 1, NUM_FEATURES).expand(B, 2, 1, NUM_FEATURES)
        values = keys.new_zeros(B, 1, n + 1, 1)  # only the weights are used
        with torch.no_grad():
            _, weights = attention(q, keys, values, scale=1.0, return_weights=True)
            logw = torch.log(weights[:, :, 0, :])
        rel = (logw[..., :-1] - logw[..., -1:]).numpy()
        return rel[:, 0], rel[:, 1]

    def _solve_rows(self, w: np.ndarray, v: np.ndarray, caps: np.ndarray
                    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """The heuristic on ``B`` instances at once: ``w, v (B, n)``, ``caps (B,)`` (checked
        already). Items heavier than their row's capacity are never taken and do not enter the
        feature scales. Returns the chosen indices per row, their values ``(B,)`` and the chosen
        multipliers ``(B,)``."""
        B, n = w.shape
        fits = w <= caps[:, None]
        wf = np.where(fits, w, 0).astype(np.float64)
        vf = np.where(fits, v, 0).astype(np.float64)
        ratio = vf / np.where(fits, w, 1)

        def scale(a: np.ndarray) -> np.ndarray:
            m = a.max(1, keepdims=True)
            return a / np.where(m > 0, m, 1.0)

        features = torch.from_numpy(np.stack([scale(wf), scale(vf), scale(ratio)], -1))
        s1, s2 = self._head_logits(features)
        # bisection on log μ, all rows at once: smallest μ at which the items beating the null
        # token (μ s1 + s2 > 0) just fit
        def fit_at(log_mu: np.ndarray) -> np.ndarray:
            beats = (np.exp(log_mu)[:, None] * s1 + s2 > 0) & fits
            return np.where(beats, wf, 0).sum(1) <= caps

        lo = np.full(B, np.log(1e-4))
        hi = np.full(B, np.log(1e4))
        done = fit_at(lo)
        for _ in range(self.bisection_steps):
            mid = 0.5 * (lo + hi)
            ok = fit_at(mid)
            hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
        mu_c = np.exp(np.where(done, lo, hi))
        factors = np.exp(np.linspace(-self.spread, self.spread, self.num_candidates))
        mus = np.sort(np.concatenate([mu_c[:, None], mu_c[:, None] * factors[None]], 1), 1)
        K = mus.shape[1]
        keys = mus[:, :, None] * s1[:, None] + s2[:, None]  # (B, K, n)
        keys = np.where(fits[:, None], keys, -np.inf).reshape(B * K, n)
        order = np.argsort(-keys, axis=1, kind="stable")
        rows = np.repeat(np.arange(B), K)
        taken = greedy_fill_batch(w[rows[:, None], order], np.repeat(caps, K),
                                  fits[rows[:, None], order])
        vals = np.where(taken, v[rows[:, None], order], 0).sum(1).reshape(B, K)
        pick = vals.argmax(1)  # first best: the smallest such μ, as a scan would keep
        items, best_mu = [], mus[np.arange(B), pick]
        for b in range(B):
            r = b * K + int(pick[b])
            items.append(np.sort(order[r][taken[r]]).astype(np.int64))
        return items, vals[np.arange(B), pick], best_mu

    def solve_detailed(self, weights, values, capacity) -> KnapsackAttentionResult:
        """Chosen items and the two heads' scores; see the module docstring."""
        w, v, capacity = check_instance(weights, values, capacity)
        with _single_thread():
            items, vals, mus = self._solve_rows(w[None], v[None], np.array([capacity]))
            mu = float(mus[0])
            fits = w <= capacity
            feats = np.zeros((w.size, NUM_FEATURES))
            feats[fits] = item_features(w[fits], v[fits])
            with torch.no_grad():
                heads = self.heads(torch.from_numpy(feats), mu)[:, :-1].numpy()
        heads = np.where(fits[None], heads, 0.0)  # skipped items: no attention reported
        return KnapsackAttentionResult(
            items=items[0], value=float(vals[0]), weight=float(w[items[0]].sum()),
            weight_head=heads[0], value_head=heads[1], product=heads[0] * heads[1],
            multiplier=mu, temperatures=_temperatures(mu),
        )

    def solve(self, weights, values, capacity) -> np.ndarray:
        """Chosen item indices ``(k,)`` (sorted) for ``weights (n,)``, ``values (n,)`` and a
        capacity > 0; their total weight never exceeds the capacity, and items heavier than it
        are skipped. Bad input raises ``ValueError`` naming the argument."""
        w, v, capacity = check_instance(weights, values, capacity)
        with _single_thread():
            return self._solve_rows(w[None], v[None], np.array([capacity]))[0][0]

    def solve_batch(self, weights, values, capacities) -> list[np.ndarray]:
        """Many instances in one call: ``weights (B, n)``, ``values (B, n)`` (numpy arrays or
        tensors) and ``capacities (B,)`` (or one number for all rows). Returns the chosen
        indices of each row, as :meth:`solve` would. Instances with fewer items: pad the rows
        with items heavier than the capacity (they are skipped)."""
        w = weights.detach().cpu().numpy() if isinstance(weights, torch.Tensor) else \
            np.asarray(weights)
        v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else \
            np.asarray(values)
        c = capacities.detach().cpu().numpy() if isinstance(capacities, torch.Tensor) else \
            np.asarray(capacities)
        if w.ndim != 2 or v.shape != w.shape:
            raise ValueError(f"weights and values must both have shape (B, n), got {w.shape} "
                             f"and {v.shape}")
        if w.shape[0] == 0 or w.shape[1] == 0:
            raise ValueError(f"weights is empty (shape {w.shape}): need B >= 1 rows of n >= 1")
        if c.ndim == 0:
            c = np.full(w.shape[0], c[()])
        if c.shape != (w.shape[0],):
            raise ValueError(f"capacities must have shape (B,) = ({w.shape[0]},), got {c.shape}")
        if c.dtype.kind not in "iuf":
            raise TypeError(f"capacities must be numeric, got dtype {c.dtype}")
        for row in range(w.shape[0]):  # the same checks (and messages) as a single solve
            check_instance(w[row], v[row], c[row].item())
        with _single_thread():
            return self._solve_rows(w, v, c)[0]

    # ------------------------------------------------------------------ learning
    def fit(
        self,
        instances: list[KnapsackInstance],
        steps: int = 100,
        lr: float = 0.05,
        seed: int = 0,
    ) -> list[float]:
        """Learn the two queries by gradient descent on training instances.

        Each item's logit is its log-product relative to the null token at the instance's
        bisected multiplier (times a learned positive scale); the target is its membership in
        the optimal set (:func:`solve_exact`). Returns the loss per step.

        Under ``torchrun`` each rank trains a ``DistributedDataParallel`` copy on its share of
        the instances (at least one per rank); the averaged gradient is the full one.
        """
        if not instances:
            raise ValueError("fit needs at least one training instance")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0
                or not math.isfinite(lr)):
            raise ValueError(f"lr must be a finite float > 0, got {lr!r}")
        torch.manual_seed(seed)
        data = []
        for inst in instances:
            w, v, c = check_instance(*inst)
            _, opt = solve_exact(w, v, c)
            target = np.zeros(w.shape[0])
            target[opt] = 1.0
            data.append((torch.from_numpy(item_features(w, v)), w, c, torch.from_numpy(target)))
        log_gain = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        opt = torch.optim.Adam([self.queries, log_gain], lr=lr)
        # under torchrun: DDP over the queries and the gain, each rank on its instances
        net = wrap_ddp(ApplyModule(self, extra={"log_gain": log_gain}))
        data = shard(data)
        losses = []
        with _single_thread():
            for _ in range(steps):
                losses.append(self._fit_step(data, opt, log_gain, net))
        self.learned = True
        return losses

    def _fit_step(self, data, opt, log_gain, net=None) -> float:
        """One Adam step over all training instances; returns the mean logistic loss.

        ``net``: :class:`ApplyModule` over ``self`` (DDP-wrapped under torchrun) that runs the
        loss; ``data`` then holds this rank's instances."""
        opt.zero_grad()
        if net is None:
            net = ApplyModule(self)
        loss = net(self._fit_loss, data, log_gain)
        loss = rescale_mean(loss, len(data))
        loss.backward()
        opt.step()
        return float(all_reduce_mean(loss.detach()))

    def _fit_loss(self, _module, data, log_gain) -> torch.Tensor:
        """Mean logistic loss over the instances in ``data``."""
        loss = torch.zeros((), dtype=torch.float64)
        for features, w, c, target in data:
            with torch.no_grad():
                mu = self._bisect(features, w, c)
            logw = torch.log(self.heads(features, mu))
            rel = logw[:, :-1] - logw[:, -1:]
            # divide by the inverse-temperature cap so the logits start near unit size
            logit = (rel[0] + rel[1]) / _MAX_INV_T * log_gain.exp()
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(logit, target)
        return loss / len(data)
