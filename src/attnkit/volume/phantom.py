"""Shepp-Logan-style 3D phantoms: random ellipsoids with tissue labels, for training segmenters.

Each phantom is a head-like volume: an outer ellipsoidal shell ("skull", label 1) around soft
tissue (label 2) holding a few small random ellipsoids ("lesions", label 3); background is 0.
Intensities follow the Shepp-Logan idea (bright shell, grey tissue, brighter/darker lesions) and
then get a random global gain and offset (scanner intensity changes), a smooth multiplicative
bias field and Gaussian noise, so a voxel's intensity alone does not give its label.
"""

from __future__ import annotations

import numpy as np

__all__ = ["make_phantom", "make_phantoms", "NUM_CLASSES", "CLASS_NAMES"]

CLASS_NAMES = ("background", "shell", "tissue", "lesion")
NUM_CLASSES = len(CLASS_NAMES)


def _rotation(rng: np.random.Generator, ndim: int, max_angle: float) -> np.ndarray:
    """A random rotation with angles up to ``max_angle`` radians in each coordinate plane."""
    r = np.eye(ndim)
    for i in range(ndim):
        for j in range(i + 1, ndim):
            a = rng.uniform(-max_angle, max_angle)
            g = np.eye(ndim)
            g[i, i] = g[j, j] = np.cos(a)
            g[i, j], g[j, i] = -np.sin(a), np.sin(a)
            r = r @ g
    return r


def _inside(coords: np.ndarray, centre, semi_axes, rot: np.ndarray) -> np.ndarray:
    """Bool mask of points ``coords (..., ndim)`` inside the rotated ellipsoid."""
    local = (coords - np.asarray(centre)) @ rot
    return ((local / np.asarray(semi_axes)) ** 2).sum(-1) <= 1.0


def make_phantom(
    shape: tuple[int, ...] | int,
    rng: np.random.Generator | int | None = None,
    *,
    num_lesions: tuple[int, int] = (2, 4),
    noise: float = 0.08,
    intensity_jitter: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: ``(volume (*shape) float32, labels (*shape) int64 in 0..3)``.

    Args:
        shape: spatial size, e.g. ``(32, 32, 32)`` (an int means a cube); 2 or 3 axes.
        rng: a NumPy generator or seed.
        num_lesions: inclusive range of the number of lesion ellipsoids.
        noise: standard deviation of the Gaussian noise (relative to the shell intensity 1).
        intensity_jitter: random gain in [0.6, 1.4], offset in [-0.2, 0.2] and a smooth bias
            field of +-20%.
    """
    if isinstance(shape, int):
        shape = (shape,) * 3
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 4:
        raise ValueError(f"shape must have 2 or 3 axes of size >= 4, got {shape}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = np.random.default_rng(rng)
    ndim = len(shape)
    # Coordinates in [-1, 1] per axis (voxel centres).
    axes = [(np.arange(s) + 0.5) / s * 2 - 1 for s in shape]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"), -1)

    labels = np.zeros(shape, np.int64)
    intensity = np.zeros(shape, np.float64)
    rot = _rotation(rng, ndim, 0.35)
    centre = rng.uniform(-0.08, 0.08, ndim)
    outer = rng.uniform(0.72, 0.92, ndim)
    thickness = rng.uniform(0.10, 0.16)
    head = _inside(coords, centre, outer, rot)
    brain = _inside(coords, centre, outer - thickness, rot)
    labels[head] = 1
    intensity[head] = 1.0
    labels[brain] = 2
    tissue_level = rng.uniform(0.25, 0.4)
    intensity[brain] = tissue_level
    for _ in range(rng.integers(num_lesions[0], num_lesions[1] + 1)):
        # A lesion lies well inside the tissue ellipsoid.
        inner = outer - thickness
        semi = rng.uniform(0.12, 0.25, ndim) * inner.min()
        local = rng.uniform(-0.5, 0.5, ndim) * (inner - semi.max())
        c = centre + local @ rot.T
        lesion = _inside(coords, c, semi, _rotation(rng, ndim, np.pi)) & brain
        labels[lesion] = 3
        # Lesions differ from tissue by a clear (brighter or darker) contrast.
        intensity[lesion] = tissue_level + rng.choice([-1, 1]) * rng.uniform(0.2, 0.3)
    if intensity_jitter:
        gain, offset = rng.uniform(0.6, 1.4), rng.uniform(-0.2, 0.2)
        slope = rng.uniform(-0.2, 0.2, ndim)
        field = 1.0 + coords @ slope  # smooth multiplicative bias field
        intensity = intensity * gain * field + offset
    intensity = intensity + rng.normal(0.0, noise, shape)
    return intensity.astype(np.float32), labels


def make_phantoms(
    n: int, shape: tuple[int, ...] | int, seed: int = 0, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` phantoms: ``(volumes (n, *shape) float32, labels (n, *shape) int64)``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    pairs = [make_phantom(shape, rng, **kwargs) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
