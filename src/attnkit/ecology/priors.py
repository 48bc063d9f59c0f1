"""Trophic priors: a per-species trait the trophic bias reads, and where it comes from.

* ``"niche"``: the niche value of a niche-model web (the trait the generator placed the links
  by; a stand-in for body size). Only for webs from :func:`~attnkit.ecology.niche_model`.
* ``"isotope"``: a *simulated* stable-isotope trophic position: the species' trophic level in
  the full published web (living and detritus compartments, flow-weighted when the web has
  flows, as assimilated diet is what delta-15N integrates) plus Gaussian measurement noise of
  SD ``noise_sd`` trophic levels. No isotope data are read; it stands for what a field study
  would measure independently of the link list, with a chosen error.
* ``"training"``: the old behaviour: trophic levels computed from the training links of the
  split, i.e. information the species embeddings already see.

Every prior is standardised within a web (zero mean, unit SD) before it reaches the bias, so
one knot grid on ``[-4, 4]`` fits niche values in ``[0, 1]`` and trophic levels in ``[1, 5]``
alike; the bias is learned, so the affine change loses nothing.
"""

from __future__ import annotations

import numpy as np

from .io import FoodWeb
from .trophic import trophic_levels

PRIORS = ("niche", "isotope", "training")
#: Measurement-error SDs (trophic levels) swept for the isotope prior.
ISOTOPE_NOISE_SWEEP = (0.0, 0.25, 0.5, 1.0)


def standardise(trait: np.ndarray) -> np.ndarray:
    """``(S,)`` -> ``(S,)`` zero mean, unit SD (all zeros if the trait is constant)."""
    x = np.asarray(trait, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"trait must be a non-empty (S,) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("trait must be finite")
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def full_web_levels(web: FoodWeb, living: np.ndarray | None = None) -> np.ndarray:
    """Trophic levels of ``web``'s living compartments in the full web (living + detritus;
    boundary compartments dropped), flow-weighted when the flows are not all 0/1.

    ``living``: the indices (into ``web``) of the species to return; default every compartment
    of type ``"living"``. Detritivores thus sit above 1, as their isotopes would say, although
    the detritus links are not in the living link list the predictors learn from.
    """
    inner = [i for i, t in enumerate(web.types) if t in ("living", "detritus")]
    if not inner:
        raise ValueError(f"food web {web.title!r} has no living or detritus compartment")
    sub = web.subweb(inner)
    weighted = bool(np.any((sub.flows > 0) & (sub.flows != 1.0)))
    levels = trophic_levels(sub.flows, weighted=weighted)
    if living is None:
        living = np.array([i for i, t in enumerate(web.types) if t == "living"])
    where = {w: k for k, w in enumerate(inner)}
    missing = [int(i) for i in living if int(i) not in where]
    if missing:
        raise ValueError(f"indices {missing[:5]} are not living or detritus compartments")
    return levels[[where[int(i)] for i in living]]


def isotope_prior(levels: np.ndarray, noise_sd: float, rng: np.random.Generator) -> np.ndarray:
    """A simulated isotope trophic position: ``levels + N(0, noise_sd^2)`` per species.

    ``levels``: ``(S,)`` full-web trophic levels (:func:`full_web_levels`); ``rng`` makes the
    measurement reproducible (the same generator state gives the same noise).
    """
    levels = np.asarray(levels, dtype=np.float64)
    if levels.ndim != 1 or not np.isfinite(levels).all():
        raise ValueError(f"levels must be a finite (S,) array, got shape {levels.shape}")
    if not (np.isfinite(noise_sd) and noise_sd >= 0):
        raise ValueError(f"noise_sd must be a finite number >= 0, got {noise_sd}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator, got {type(rng).__name__}")
    return levels + rng.normal(0.0, float(noise_sd), levels.shape)


def training_prior(train_flows: np.ndarray, weighted: bool = False) -> np.ndarray:
    """The old prior: trophic levels of the split's *training* links only (held-out links are
    zero in ``train_flows`` and so cannot enter)."""
    return trophic_levels(np.asarray(train_flows, dtype=np.float64), weighted=weighted)
