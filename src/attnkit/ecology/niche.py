"""The niche model of Williams & Martinez (2000, Nature 404:180), a food-web generator."""

from __future__ import annotations

import numpy as np

from ..checks import check_positive_int
from .io import FoodWeb


def _niche_links(
    rng: np.random.Generator, num_species: int, connectance: float
) -> tuple[np.ndarray, np.ndarray]:
    """One draw: ``(S, S)`` bool ``links[prey, predator]`` and the ``(S,)`` sorted niche values
    (species sorted by niche value)."""
    beta = 1.0 / (2.0 * connectance) - 1.0  # E[range] = 2C * niche value -> E[L/S^2] = C
    niche = np.sort(rng.uniform(0.0, 1.0, num_species))
    radius = niche * rng.beta(1.0, beta, num_species)
    radius[0] = 0.0  # the species with the lowest niche value is basal, as in the original
    centre = rng.uniform(radius / 2.0, niche)
    lo = centre - radius / 2.0
    hi = centre + radius / 2.0
    # predator j eats prey i iff niche[i] lies in predator j's feeding range.
    return (niche[:, None] >= lo[None, :]) & (niche[:, None] <= hi[None, :]), niche


def niche_model(
    num_species: int,
    connectance: float,
    seed: int | np.random.Generator | None = None,
    *,
    max_tries: int = 1000,
    return_niche: bool = False,
) -> FoodWeb | tuple[FoodWeb, np.ndarray]:
    """A binary food web from the Williams-Martinez (2000) niche model.

    Each species draws a niche value ``n ~ U(0, 1)``, a feeding range ``r = n x`` with
    ``x ~ Beta(1, 1/(2C) - 1)`` and a range centre ``c ~ U(r/2, n)``, and eats every species whose
    niche value lies in ``[c - r/2, c + r/2]``; the species with the lowest niche value gets
    ``r = 0`` (basal). As in the original, draws with a species that has no link at all, or
    that split into disconnected pieces, are rejected and redrawn. Species are returned sorted
    by niche value (so every diet is a contiguous index range); flows are 1 on links, biomass NaN.

    Args:
        num_species: S >= 2.
        connectance: target directed connectance ``L / S^2``, in ``(0, 0.5)``.
        seed: int, ``numpy.random.Generator`` or None.
        max_tries: draws before giving up.
        return_niche: also return the ``(S,)`` niche values (ascending, one per species), the
            trait the generator placed the links by (a stand-in for body size).

    Raises:
        ValueError: arguments out of range.
        RuntimeError: no acceptable web within ``max_tries`` draws (never a silent bad web).
    """
    if isinstance(num_species, bool) or not isinstance(num_species, (int, np.integer)):
        raise TypeError(f"num_species must be an int, got {type(num_species).__name__}")
    if num_species < 2:
        raise ValueError(f"num_species must be >= 2, got {num_species}")
    if not 0.0 < float(connectance) < 0.5:
        raise ValueError(f"connectance must be in (0, 0.5) (Beta(1, 1/(2C)-1)), got {connectance}")
    check_positive_int("max_tries", max_tries)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    for _ in range(max_tries):
        links, niche = _niche_links(rng, int(num_species), float(connectance))
        touched = links.any(axis=0) | links.any(axis=1)
        if not touched.all():
            continue
        sym = links | links.T
        seen = np.zeros(num_species, dtype=bool)
        seen[0] = True
        frontier = seen.copy()
        while frontier.any():
            nxt = sym[frontier].any(axis=0) & ~seen
            seen |= nxt
            frontier = nxt
        if not seen.all():
            continue
        web = FoodWeb(
            names=tuple(f"species_{i}" for i in range(num_species)),
            types=("living",) * num_species,
            flows=links.astype(np.float64),
            biomass=np.full(num_species, np.nan),
            title=f"niche(S={num_species}, C={connectance})",
        )
        return (web, niche) if return_niche else web
    raise RuntimeError(
        f"niche_model: no connected web without isolated species in {max_tries} draws "
        f"(S={num_species}, C={connectance}); raise max_tries or the connectance"
    )
