"""Food webs: trophic-flow networks, trophic levels, the niche model and attention with a
trophic-level bias for predator-prey link prediction."""

from __future__ import annotations

from .io import FoodWeb, parse_pajek, parse_scor, read_foodweb, read_pajek, read_scor, write_scor
from .model import TrophicAttention, TrophicDistanceBias
from .niche import niche_model
from .trophic import TrophicCoherence, basal_species, trophic_coherence, trophic_levels

__all__ = [
    "FoodWeb",
    "TrophicAttention",
    "TrophicCoherence",
    "TrophicDistanceBias",
    "basal_species",
    "niche_model",
    "parse_pajek",
    "parse_scor",
    "read_foodweb",
    "read_pajek",
    "read_scor",
    "trophic_coherence",
    "trophic_levels",
    "write_scor",
]
