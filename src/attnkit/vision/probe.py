"""How much a model's attention maps move when an image is made darker or brighter.

For each brightness change (``x * factor``, and ``x + shift``; no clipping, i.e. exposure
scaling) the probe compares every layer's attention maps with those of the unmodified images:
the Jensen-Shannon divergence (base 2, so in ``[0, 1]``) between each query patch's attention
distribution before and after, averaged per layer and head, the largest per-head mean and the
largest single row; and the share of images whose predicted class is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["brightness_probe", "ProbeResult", "js_divergence", "DEFAULT_FACTORS",
           "DEFAULT_SHIFTS"]

DEFAULT_FACTORS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.5, 2.0, 3.0)
DEFAULT_SHIFTS = (-0.3, -0.1, 0.1, 0.3, 0.5)


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence in bits between distributions along the last axis.

    ``p``, ``q``: ``(..., K)`` non-negative rows summing to 1. Returns ``(...)`` in ``[0, 1]``.
    """
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a: Tensor) -> Tensor:  # 0 * log 0 = 0
        return torch.where(a > 0, a * (torch.log2(a.clamp_min(1e-300)) - torch.log2(
            m.clamp_min(1e-300))), torch.zeros_like(a)).sum(-1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp(0.0, 1.0)


@dataclass
class ProbeResult:
    """Per brightness change: ``rows`` of dicts with keys ``kind`` ("scale" or "shift"),
    ``value``, ``js_mean`` (mean over layers, heads, images, query rows), ``js_head_max``
    (largest per-(layer, head) mean), ``js_row_max`` (largest single-row divergence),
    ``pred_agree`` (share of unchanged predictions) and ``js_per_layer``; ``js_per_head[i]`` is
    the ``(depth, H)`` array of row ``i``."""

    rows: list[dict] = field(default_factory=list)
    js_per_head: list[np.ndarray] = field(default_factory=list)

    def at(self, kind: str, value: float) -> dict:
        for row in self.rows:
            if row["kind"] == kind and abs(row["value"] - value) < 1e-9:
                return row
        raise KeyError(f"no {kind} {value} in the probe (have "
                       f"{[(r['kind'], r['value']) for r in self.rows]})")


@torch.no_grad()
def _maps_and_preds(model: nn.Module, images: Tensor, batch_size: int):
    maps, preds = None, []
    for s in range(0, len(images), batch_size):
        logits, layer_maps = model(images[s:s + batch_size], need_weights=True)
        if not isinstance(layer_maps, (list, tuple)) or not layer_maps:
            raise TypeError("model(x, need_weights=True) must return (logits, [maps per layer])")
        maps = [[] for _ in layer_maps] if maps is None else maps
        for store, w in zip(maps, layer_maps):
            store.append(w.float())
        preds.append(logits.argmax(-1))
    return [torch.cat(m) for m in maps], torch.cat(preds)


def brightness_probe(
    model: nn.Module,
    images: Tensor | np.ndarray,
    factors: tuple[float, ...] = DEFAULT_FACTORS,
    shifts: tuple[float, ...] = DEFAULT_SHIFTS,
    *,
    batch_size: int = 256,
) -> ProbeResult:
    """Attention change and prediction agreement under brightness changes.

    Args:
        model: called as ``model(x, need_weights=True) -> (logits (N, K), [maps (N, H, L, L)
            per layer])`` (e.g. :class:`attnkit.vision.ViT`); put in eval mode for the probe.
        images: ``(N, C, H, W)`` unmodified images.
        factors: multiplicative brightness factors (``> 0``), e.g. 0.1 .. 3.0.
        shifts: additive brightness shifts.

    Returns:
        :class:`ProbeResult`, one row per factor then per shift.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, Tensor) or images.dim() != 4 or len(images) == 0:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got {shape}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be floating point, got {images.dtype}")
    for f in factors:
        if not f > 0:
            raise ValueError(f"brightness factors must be > 0, got {f}")
    was_training = model.training
    model.eval()
    try:
        base_maps, base_pred = _maps_and_preds(model, images, batch_size)
        result = ProbeResult()
        changes = [("scale", float(f)) for f in factors] + [("shift", float(s)) for s in shifts]
        for kind, value in changes:
            x = images * value if kind == "scale" else images + value
            maps, pred = _maps_and_preds(model, x, batch_size)
            js = [js_divergence(a, b) for a, b in zip(base_maps, maps)]  # (N, H, L) per layer
            per_head = torch.stack([j.mean((0, 2)) for j in js]).numpy()  # (depth, H)
            result.js_per_head.append(per_head)
            result.rows.append({
                "kind": kind,
                "value": value,
                "js_mean": float(per_head.mean()),
                "js_head_max": float(per_head.max()),
                "js_row_max": float(max(j.max() for j in js)),
                "pred_agree": float((pred == base_pred).double().mean()),
                "js_per_layer": [float(v) for v in per_head.mean(1)],
            })
        return result
    finally:
        model.train(was_training)
