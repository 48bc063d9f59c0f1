"""TrophicAttention: species are tokens, a predator's softmax over prey is its predicted diet.

Logits are ``scale * q_i . k_j + b(TL_i - TL_j)``: predator queries, prey keys (learned species
embeddings) plus an additive bias ``b`` that is a learned function of the trophic-level
difference between predator ``i`` and prey ``j`` (a relative-position bias over trophic
distance). ``b`` is a piecewise-linear curve through learned values at evenly spaced knots.
Self-feeding (the diagonal) is masked out. Every predator also sees one learned "no prey" key
(with no trophic bias): a species that eats nothing in the web (basal) puts its mass there,
instead of being forced by the softmax to spread a full unit of diet over species it does not
eat. The scores go through :func:`attnkit.attention`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit import attention

BIASES = ("trophic", None)


class TrophicDistanceBias(nn.Module):
    """A learned function of the trophic-level difference ``d``: piecewise linear through
    ``num_knots`` values on ``[-max_distance, max_distance]`` (constant beyond), zero at start.
    """

    def __init__(self, num_knots: int = 17, max_distance: float = 4.0) -> None:
        super().__init__()
        if not isinstance(num_knots, int) or num_knots < 2:
            raise ValueError(f"num_knots must be an int >= 2, got {num_knots}")
        if not max_distance > 0:
            raise ValueError(f"max_distance must be > 0, got {max_distance}")
        self.max_distance = float(max_distance)
        self.values = nn.Parameter(torch.zeros(num_knots))

    @property
    def knots(self) -> Tensor:
        m = self.max_distance
        return torch.linspace(-m, m, self.values.numel(), dtype=self.values.dtype)

    def forward(self, distance: Tensor) -> Tensor:
        """``distance`` of any shape -> bias of the same shape."""
        k = self.values.numel()
        m = self.max_distance
        pos = (distance.clamp(-m, m) + m) * ((k - 1) / (2 * m))
        left = pos.floor().clamp(0, k - 2)
        frac = pos - left
        left = left.long()
        return self.values[left] * (1 - frac) + self.values[left + 1] * frac


class TrophicAttention(nn.Module):
    """Diet prediction by attention over species.

    Args:
        num_species: S.
        dim: embedding / head dimension D.
        bias: ``"trophic"`` (learned bias over ``TL_predator - TL_prey``) or ``None`` (ablation).
        num_knots, max_distance: resolution and range of the trophic bias curve.
    """

    def __init__(
        self,
        num_species: int,
        dim: int,
        bias: str | None = "trophic",
        *,
        num_knots: int = 17,
        max_distance: float = 4.0,
    ) -> None:
        super().__init__()
        if not isinstance(num_species, int) or num_species < 2:
            raise ValueError(f"num_species must be an int >= 2, got {num_species}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim}")
        if bias not in BIASES:
            raise ValueError(f"bias must be one of {BIASES}, got {bias!r}")
        self.num_species = num_species
        self.dim = dim
        self.bias_kind = bias
        self.species = nn.Embedding(num_species, dim)
        nn.init.normal_(self.species.weight, std=0.5)
        self.to_query = nn.Linear(dim, dim, bias=False)
        self.to_key = nn.Linear(dim, dim, bias=False)
        self.no_prey_key = nn.Parameter(torch.zeros(dim))
        self.trophic_bias = (
            TrophicDistanceBias(num_knots, max_distance) if bias == "trophic" else None
        )

    def logit_bias(self, trophic_levels: Tensor | None) -> Tensor:
        """``(S, S + 1)`` additive logits: ``b(TL_i - TL_j)`` (or 0), ``-inf`` on the diagonal,
        0 for the last column (the "no prey" key)."""
        s = self.num_species
        dtype = self.species.weight.dtype
        if self.trophic_bias is None:
            out = torch.zeros(s, s, dtype=dtype)
        else:
            if trophic_levels is None:
                raise ValueError("bias='trophic' needs trophic_levels, a (S,) tensor")
            tl = torch.as_tensor(trophic_levels, dtype=dtype)
            if tl.shape != (s,):
                raise ValueError(f"trophic_levels must have shape (S,) = ({s},), "
                                 f"got {tuple(tl.shape)}")
            if not bool(torch.isfinite(tl).all()):
                raise ValueError("trophic_levels must be finite")
            out = self.trophic_bias(tl[:, None] - tl[None, :])
        eye = torch.eye(s, dtype=torch.bool)
        out = out.masked_fill(eye, float("-inf"))
        return torch.cat([out, out.new_zeros(s, 1)], dim=1)

    def forward(self, trophic_levels: Tensor | None = None) -> Tensor:
        """Predicted diets ``(S, S + 1)``: row ``i`` is predator ``i``'s distribution over the
        prey ``j < S`` plus, in column ``S``, the probability of eating nothing in the web (rows
        sum to 1, zero diagonal). ``trophic_levels``: ``(S,)`` (ignored when ``bias=None``)."""
        x = self.species.weight
        q = self.to_query(x)[None, None]  # (1, 1, S, D)
        k = torch.cat([self.to_key(x), self.no_prey_key[None]], dim=0)[None, None]
        bias = self.logit_bias(trophic_levels)[None, None]
        _, weights = attention(q, k, k, bias=bias, return_weights=True)
        return weights[0, 0]
