"""Trophic levels and trophic coherence.

* Levine (1980) levels: basal species (no prey) sit at level 1 and every consumer one level
  above the (flow-weighted or plain) average of its prey: ``s = 1 + D s`` with ``D[i, j]`` the
  fraction of ``i``'s diet that comes from ``j``; one linear solve. It needs every species to be
  reachable from a basal one.
* MacKay, Johnson & Sansom (2020, "How directed is a directed network?"): levels ``h`` solving
  ``(diag(u) - W - W^T) h = v`` with ``u = w_in + w_out`` and ``v = w_in - w_out``, a least-squares
  fit of ``h_j - h_i = 1`` over the links ``i -> j``. No basal species needed; levels are fixed
  up to a constant per weakly connected component, which we set so each component's lowest
  level is 1 (as Levine's basal level).
* Coherence: Johnson et al. (2014)'s incoherence parameter ``q``, the standard deviation of the
  trophic distances ``s_j - s_i`` over the links, and MacKay's trophic incoherence ``F0``.

``flows[i, j]`` is the flow from prey ``i`` to predator ``j`` (see :mod:`attnkit.ecology.io`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .io import FoodWeb

METHODS = ("auto", "basal", "mackay")


def _as_flows(web: FoodWeb | np.ndarray, weighted: bool) -> np.ndarray:
    flows = web.flows if isinstance(web, FoodWeb) else np.asarray(web, dtype=np.float64)
    if flows.ndim != 2 or flows.shape[0] != flows.shape[1]:
        raise ValueError(f"flows must be a square (S, S) matrix, got shape {flows.shape}")
    if flows.shape[0] == 0:
        raise ValueError("the web is empty (0 species)")
    if not np.isfinite(flows).all():
        raise ValueError("flows must be finite")
    if (flows < 0).any():
        raise ValueError("flows must be >= 0 (negative flow found)")
    return flows if weighted else (flows > 0).astype(np.float64)


def _reachable_from(sources: np.ndarray, adjacency: np.ndarray) -> np.ndarray:
    """Bool ``(S,)``: reachable from any ``sources`` along ``adjacency[i, j]`` (i -> j)."""
    seen = sources.copy()
    frontier = sources.copy()
    while frontier.any():
        nxt = adjacency[frontier].any(axis=0) & ~seen
        seen |= nxt
        frontier = nxt
    return seen


def _weak_components(adjacency: np.ndarray) -> np.ndarray:
    """Component label per node of the undirected version of ``adjacency``."""
    sym = adjacency | adjacency.T
    labels = np.full(sym.shape[0], -1)
    for start in range(sym.shape[0]):
        if labels[start] >= 0:
            continue
        one = np.zeros(sym.shape[0], dtype=bool)
        one[start] = True
        labels[_reachable_from(one, sym)] = start
    return labels


def basal_species(web: FoodWeb | np.ndarray) -> np.ndarray:
    """Bool ``(S,)``: species that eat nothing in the web (no incoming flow, self-loops aside)."""
    flows = _as_flows(web, weighted=False).copy()
    np.fill_diagonal(flows, 0.0)
    return flows.sum(axis=0) == 0


def _levine_levels(w: np.ndarray) -> np.ndarray:
    n = w.shape[0]
    intake = w.sum(axis=0)
    basal = basal_species(w)
    if not basal.any():
        raise ValueError(
            "the web has no basal species (every species eats something), so basal-anchored "
            "trophic levels are undefined; use method='mackay' (or 'auto')"
        )
    reach = _reachable_from(basal, w > 0)
    if not reach.all():
        raise ValueError(
            f"{int((~reach).sum())} species are not reachable from any basal species (a closed "
            "feeding loop), so basal-anchored levels are undefined; use method='mackay' "
            "(or 'auto')"
        )
    diet = np.zeros((n, n))
    consumers = ~basal
    diet[consumers] = w.T[consumers] / intake[consumers, None]
    # A basal species' only "prey" can be itself (a self-loop); it stays at level 1.
    diet[basal] = 0.0
    return np.linalg.solve(np.eye(n) - diet, np.ones(n))


def _mackay_levels(w: np.ndarray) -> np.ndarray:
    w_in = w.sum(axis=0)
    w_out = w.sum(axis=1)
    laplacian = np.diag(w_in + w_out) - w - w.T
    imbalance = w_in - w_out
    # Singular (a constant per component) but consistent: lstsq gives the min-norm solution.
    levels = np.linalg.lstsq(laplacian, imbalance, rcond=None)[0]
    labels = _weak_components(w > 0)
    for lab in np.unique(labels):
        members = labels == lab
        levels[members] += 1.0 - levels[members].min()
    return levels


def trophic_levels(
    web: FoodWeb | np.ndarray, *, weighted: bool = True, method: str = "auto"
) -> np.ndarray:
    """Trophic level of every species.

    Args:
        web: a :class:`FoodWeb` (all its compartments are used: pass ``web.living()`` for the
            living sub-web) or an ``(S, S)`` flow matrix, ``flows[prey, predator] >= 0``.
        weighted: ``True`` for flow-weighted levels (diet fractions by flow), ``False`` for
            prey-averaged levels (every prey counts equally).
        method: ``"basal"`` (Levine's linear solve, basal species at 1), ``"mackay"`` (MacKay
            et al. 2020, no basal species required) or ``"auto"`` (basal when every species is
            reachable from a basal species, MacKay otherwise).

    Returns:
        ``(S,)`` float64 levels.

    Raises:
        ValueError: bad flows; ``method="basal"`` on a web without basal species or with a
            closed feeding loop unreachable from basal species.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    w = _as_flows(web, weighted)
    if method == "mackay":
        return _mackay_levels(w)
    if method == "basal":
        return _levine_levels(w)
    basal = basal_species(w)
    if basal.any() and _reachable_from(basal, w > 0).all():
        return _levine_levels(w)
    return _mackay_levels(w)


@dataclass(frozen=True)
class TrophicCoherence:
    """Coherence of a web.

    Attributes:
        q: incoherence parameter (Johnson et al. 2014): standard deviation of the trophic
            distances ``s_predator - s_prey`` over the links (0 for a perfectly layered web).
        F0: MacKay's trophic incoherence, ``sum_ij w_ij (h_j - h_i - 1)^2 / sum_ij w_ij`` with
            MacKay levels ``h`` (0 coherent, 1 incoherent); ``1 - F0`` is the trophic coherence.
        mean_distance: mean trophic distance over the links (1 for prey-averaged levels).
        levels: the ``(S,)`` levels used for ``q``.
    """

    q: float
    F0: float
    mean_distance: float
    levels: np.ndarray


def trophic_coherence(
    web: FoodWeb | np.ndarray, *, weighted: bool = False, method: str = "auto"
) -> TrophicCoherence:
    """Trophic incoherence ``q`` and MacKay's ``F0`` of ``web`` (see :class:`TrophicCoherence`).

    ``q`` uses :func:`trophic_levels` (``weighted``, ``method``) over the unweighted links, as
    Johnson et al. define it; ``F0`` uses MacKay levels weighted by the flows when ``weighted``.

    Raises:
        ValueError: bad flows or a web without links.
    """
    w = _as_flows(web, weighted)
    links = np.argwhere(w > 0)
    if links.size == 0:
        raise ValueError("the web has no links; coherence is undefined")
    levels = trophic_levels(w, weighted=weighted, method=method)
    distance = levels[links[:, 1]] - levels[links[:, 0]]
    h = _mackay_levels(w)
    weights = w[links[:, 0], links[:, 1]]
    misfit = h[links[:, 1]] - h[links[:, 0]] - 1.0
    f0 = float((weights * misfit**2).sum() / weights.sum())
    return TrophicCoherence(q=float(distance.std()), F0=f0, mean_distance=float(distance.mean()),
                            levels=levels)
