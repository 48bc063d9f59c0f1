"""How much a model's attention maps move when an image is made darker or brighter.

For each brightness change (``x * factor``, and ``x + shift``; no clipping, i.e. exposure
scaling) the probe compares every layer's attention maps with those of the unmodified images:
the Jensen-Shannon divergence (base 2, so in ``[0, 1]``) between each query patch's attention
distribution before and after, averaged per layer and head, the largest per-head mean and the
largest single row; and the share of images whose predicted class is unchanged.

Raw JS depends on how flat the maps are (two nearly uniform maps are close whatever the input),
so each layer's mean JS is also *normalised* by the same layer's mean JS between the maps of two
different images (each image paired with another one by a fixed derangement): ``njs = 0`` means
the maps did not move, ``njs = 1`` that they moved as far as showing the model another image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["brightness_probe", "ProbeResult", "js_divergence", "normalised_js",
           "other_image_pairing", "DEFAULT_FACTORS", "DEFAULT_SHIFTS"]

DEFAULT_FACTORS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.5, 2.0, 3.0)
#: Seed of the fixed pairing of each image with a different one (normalised JS).
PAIRING_SEED = 0
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


def other_image_pairing(n: int, seed: int = PAIRING_SEED) -> Tensor:
    """A fixed derangement of ``range(n)`` (``perm[i] != i``): image ``i`` is compared with
    image ``perm[i]`` (a random order, shifted by one place)."""
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"normalised JS needs at least 2 images, got n={n!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(1)
    return perm


def _layer_js(a: list[Tensor], b: list[Tensor]) -> np.ndarray:
    """Mean JS per layer over images, heads and query rows: ``(depth,)``."""
    return np.array([float(js_divergence(x, y).mean()) for x, y in zip(a, b)])


def normalised_js(
    base: list[Tensor], changed: list[Tensor], perm: Tensor | None = None,
    between: np.ndarray | None = None,
) -> np.ndarray:
    """Per-layer mean JS between ``base`` and ``changed`` maps divided by the per-layer mean JS
    between ``base`` maps of different images (image ``i`` vs ``perm[i]``).

    Args:
        base, changed: one tensor per layer, ``(N, H, L, L)`` attention maps (rows sum to 1).
        perm: the pairing ``(N,)`` (default :func:`other_image_pairing`).
        between: the per-layer normaliser when already computed for these ``base`` maps.

    Returns:
        ``(depth,)``: 0 for identical maps, about 1 when ``changed`` is as far from ``base`` as
        another image's maps are (NaN for a layer whose maps do not depend on the image).
    """
    if len(base) != len(changed) or not base:
        raise ValueError(f"base and changed must list the same layers, got {len(base)} and "
                         f"{len(changed)}")
    for a, b in zip(base, changed):
        if a.shape != b.shape or a.dim() != 4:
            raise ValueError(f"maps must be matching (N, H, L, L) tensors, got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
    if between is None:
        perm = other_image_pairing(len(base[0])) if perm is None else perm
        between = _layer_js(base, [a[perm] for a in base])
    between = np.asarray(between, dtype=np.float64)
    moved = _layer_js(base, changed)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(between > 0, moved / np.where(between > 0, between, 1.0), np.nan)


@dataclass
class ProbeResult:
    """Per brightness change: ``rows`` of dicts with keys ``kind`` ("scale" or "shift"),
    ``value``, ``js_mean`` (mean over layers, heads, images, query rows), ``js_head_max``
    (largest per-(layer, head) mean), ``js_row_max`` (largest single-row divergence),
    ``pred_agree`` (share of unchanged predictions), ``js_per_layer``, ``njs_per_layer`` and
    ``njs_mean`` (normalised JS, see :func:`normalised_js`; mean over layers) and, when labels
    were given, ``accuracy``; ``js_per_head[i]`` is the ``(depth, H)`` array of row ``i``.
    ``js_between_images`` is the per-layer normaliser and ``base_accuracy`` the accuracy on
    the unmodified images (NaN without labels)."""

    rows: list[dict] = field(default_factory=list)
    js_per_head: list[np.ndarray] = field(default_factory=list)
    js_between_images: list[float] = field(default_factory=list)
    base_accuracy: float = float("nan")

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
    labels: Tensor | np.ndarray | None = None,
    batch_size: int = 256,
) -> ProbeResult:
    """Attention change and prediction agreement under brightness changes.

    Args:
        model: called as ``model(x, need_weights=True) -> (logits (N, K), [maps (N, H, L, L)
            per layer])`` (e.g. :class:`attnkit.vision.ViT`); put in eval mode for the probe.
        images: ``(N, C, H, W)`` unmodified images.
        factors: multiplicative brightness factors (``> 0``), e.g. 0.1 .. 3.0.
        shifts: additive brightness shifts.
        labels: optional ``(N,)`` classes: rows then carry the ``accuracy`` on changed images.

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
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got "
                             f"{tuple(labels.shape)}")
    perm = other_image_pairing(len(images)) if len(images) > 1 else None
    was_training = model.training
    model.eval()
    try:
        base_maps, base_pred = _maps_and_preds(model, images, batch_size)
        result = ProbeResult()
        if perm is not None:
            result.js_between_images = [float(v) for v in
                                        _layer_js(base_maps, [a[perm] for a in base_maps])]
        if labels is not None:
            result.base_accuracy = float((base_pred == labels).double().mean())
        changes = [("scale", float(f)) for f in factors] + [("shift", float(s)) for s in shifts]
        for kind, value in changes:
            x = images * value if kind == "scale" else images + value
            maps, pred = _maps_and_preds(model, x, batch_size)
            js = [js_divergence(a, b) for a, b in zip(base_maps, maps)]  # (N, H, L) per layer
            per_head = torch.stack([j.mean((0, 2)) for j in js]).numpy()  # (depth, H)
            result.js_per_head.append(per_head)
            njs = (normalised_js(base_maps, maps, between=np.array(result.js_between_images))
                   if perm is not None
                   else np.full(len(maps), np.nan))
            result.rows.append({
                "kind": kind,
                "value": value,
                "js_mean": float(per_head.mean()),
                "js_head_max": float(per_head.max()),
                "js_row_max": float(max(j.max() for j in js)),
                "pred_agree": float((pred == base_pred).double().mean()),
                "js_per_layer": [float(v) for v in per_head.mean(1)],
                "njs_mean": float(njs.mean()),
                "njs_per_layer": [float(v) for v in njs],
                **({} if labels is None else
                   {"accuracy": float((pred == labels).double().mean())}),
            })
        return result
    finally:
        model.train(was_training)
