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
from attnkit.checks import check_positive_int

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
        return piecewise_linear(self.values[None], distance[None], self.max_distance)[0]


def piecewise_linear(values: Tensor, distance: Tensor, max_distance: float) -> Tensor:
    """``B`` piecewise-linear curves at once: ``values`` ``(B, K)`` at ``K`` evenly spaced knots on
    ``[-max_distance, max_distance]`` (constant beyond), evaluated at ``distance`` ``(B, ...)``
    -> ``(B, ...)``; curve ``b`` is read at ``distance[b]``."""
    k = values.shape[-1]
    m = max_distance
    pos = (distance.clamp(-m, m) + m) * ((k - 1) / (2 * m))
    left = pos.floor().clamp(0, k - 2)
    frac = pos - left
    flat = left.long().reshape(values.shape[0], -1)
    lo = values.gather(1, flat).reshape(distance.shape)
    hi = values.gather(1, flat + 1).reshape(distance.shape)
    return lo * (1 - frac) + hi * frac


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
        check_positive_int("dim", dim)
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


class BatchedTrophicAttention(nn.Module):
    """``B`` independent :class:`TrophicAttention` models of the same size, evaluated (and
    trained) as one batch: many splits, priors and ablations of one web fit in one loop.

    Model ``b`` has its own species embeddings, query / key maps, "no prey" key and bias curve;
    no parameter is shared, and with an elementwise optimiser (Adam) summing the ``B`` losses
    trains each exactly as it would be trained alone. ``gate`` ``(B,)`` (0 or 1) switches the
    trophic bias off for the ablations (``bias=None``) inside the same batch.

    Build it with :meth:`from_models` (stacks the parameters of ``B`` initialised models, so
    each starts exactly where a :class:`TrophicAttention` of the same seed would).
    """

    def __init__(self, num_models: int, num_species: int, dim: int, *, num_knots: int = 17,
                 max_distance: float = 4.0) -> None:
        super().__init__()
        check_positive_int("num_models", num_models)
        if not isinstance(num_species, int) or num_species < 2:
            raise ValueError(f"num_species must be an int >= 2, got {num_species}")
        check_positive_int("dim", dim)
        if not max_distance > 0:
            raise ValueError(f"max_distance must be > 0, got {max_distance}")
        b, s, d = num_models, num_species, dim
        self.num_models, self.num_species, self.dim = b, s, d
        self.max_distance = float(max_distance)
        self.species = nn.Parameter(torch.randn(b, s, d) * 0.5)
        self.w_query = nn.Parameter(torch.randn(b, d, d) / d**0.5)
        self.w_key = nn.Parameter(torch.randn(b, d, d) / d**0.5)
        self.no_prey_key = nn.Parameter(torch.zeros(b, d))
        self.bias_values = nn.Parameter(torch.zeros(b, num_knots))
        self.register_buffer("gate", torch.ones(b))

    @classmethod
    def from_models(cls, models: list[TrophicAttention]) -> BatchedTrophicAttention:
        """Stack ``models`` (same ``num_species``, ``dim`` and bias curve grid) into one batch;
        a model with ``bias=None`` gets gate 0 (its curve stays at zero)."""
        if not models:
            raise ValueError("models is empty")
        first = models[0]
        curve = next((m.trophic_bias for m in models if m.trophic_bias is not None), None)
        knots, reach = (17, 4.0) if curve is None else (curve.values.numel(), curve.max_distance)
        for m in models:
            if (m.num_species, m.dim) != (first.num_species, first.dim):
                raise ValueError("models must share num_species and dim, got "
                                 f"{(m.num_species, m.dim)} and {(first.num_species, first.dim)}")
            if m.trophic_bias is not None and (m.trophic_bias.values.numel(),
                                               m.trophic_bias.max_distance) != (knots, reach):
                raise ValueError("models must share the bias curve's knots and range")
        out = cls(len(models), first.num_species, first.dim, num_knots=knots,
                  max_distance=reach)
        dtype = first.species.weight.dtype
        with torch.no_grad():
            out.species.copy_(torch.stack([m.species.weight for m in models]))
            out.w_query.copy_(torch.stack([m.to_query.weight for m in models]))
            out.w_key.copy_(torch.stack([m.to_key.weight for m in models]))
            out.no_prey_key.copy_(torch.stack([m.no_prey_key for m in models]))
            out.bias_values.zero_()
            for i, m in enumerate(models):
                if m.trophic_bias is not None:
                    out.bias_values[i] = m.trophic_bias.values
            out.gate.copy_(torch.tensor([float(m.trophic_bias is not None) for m in models]))
        return out.to(dtype)

    def forward(self, trophic_levels: Tensor) -> Tensor:
        """Predicted diets ``(B, S, S + 1)`` (see :meth:`TrophicAttention.forward`) from the
        ``(B, S)`` trait each model's bias reads (ignored where the gate is 0)."""
        b, s = self.num_models, self.num_species
        tl = torch.as_tensor(trophic_levels, dtype=self.species.dtype)
        if tl.shape != (b, s):
            raise ValueError(f"trophic_levels must have shape (B, S) = ({b}, {s}), "
                             f"got {tuple(tl.shape)}")
        if not bool(torch.isfinite(tl).all()):
            raise ValueError("trophic_levels must be finite")
        x = self.species
        q = (x @ self.w_query.transpose(1, 2))[:, None]  # (B, 1, S, D)
        k = torch.cat([x @ self.w_key.transpose(1, 2), self.no_prey_key[:, None]], dim=1)[:, None]
        bias = piecewise_linear(self.bias_values, tl[:, :, None] - tl[:, None, :],
                                self.max_distance) * self.gate[:, None, None]
        eye = torch.eye(s, dtype=torch.bool)
        bias = bias.masked_fill(eye, float("-inf"))
        bias = torch.cat([bias, bias.new_zeros(b, s, 1)], dim=2)[:, None]
        _, weights = attention(q, k, k, bias=bias, return_weights=True)
        return weights[:, 0]
