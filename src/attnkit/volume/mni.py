"""A real-anatomy tissue segmentation task from the MNI152 template shipped inside nilearn.

nilearn's wheel holds the MNI152 (2009) T1 template and its grey- and white-matter probability
maps (:func:`nilearn.datasets.load_mni152_template` and friends; nothing is downloaded). Labels:

* 0 background: outside nilearn's MNI152 brain mask;
* 1 csf_other: inside the mask, where ``1 - p_gm - p_wm`` is the largest (CSF, vessels, ...);
* 2 gm, 3 wm: inside the mask, where that tissue's probability is the largest.

Train and test come from disjoint parts of the brain: the volume is cut along one axis (by
default axis 1, posterior -> anterior at ``resolution`` mm) into a train slab, a gap of ``gap``
voxels that neither side uses, and a test slab; patches are drawn from the train slab only.
Intensities get realistic scanner changes (:func:`augment_intensity`: smooth multiplicative
bias field, gamma contrast, gain and offset, Gaussian noise) before per-volume z-scoring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MNI_CLASS_NAMES", "MniTask", "load_mni_task", "tissue_labels", "split_slabs",
           "augment_intensity", "sample_patches", "nilearn_available"]

MNI_CLASS_NAMES = ("background", "csf_other", "gm", "wm")


def nilearn_available() -> bool:
    try:
        import nilearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


def tissue_labels(gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` int64 labels from GM/WM probabilities and a bool brain mask (see module)."""
    if not (gm.shape == wm.shape == brain.shape):
        raise ValueError(f"gm, wm and brain must have one shape, got {gm.shape}, {wm.shape}, "
                         f"{brain.shape}")
    other = np.clip(1.0 - gm - wm, 0.0, 1.0)
    labels = np.argmax(np.stack([other, gm, wm]), axis=0).astype(np.int64) + 1
    labels[~brain.astype(bool)] = 0
    return labels


def split_slabs(length: int, gap: int, train_first: bool = True) -> tuple[slice, slice]:
    """Train and test index ranges along one axis of ``length`` voxels: the first half (less
    ``gap // 2``) and the second half (less the rest of the gap); they never overlap and at
    least ``gap`` voxels separate them."""
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
        raise ValueError(f"gap must be an int >= 0, got {gap!r}")
    if length < gap + 2:
        raise ValueError(f"an axis of {length} voxels cannot hold two slabs and a gap of {gap}")
    mid = length // 2
    a, b = slice(0, mid - gap // 2), slice(mid - gap // 2 + gap, length)
    return (a, b) if train_first else (b, a)


@dataclass
class MniTask:
    """``image (X, Y, Z)`` float32 T1, ``labels (X, Y, Z)`` int64, ``affine (4, 4)``; the
    ``train`` / ``test`` slabs are slices along ``axis``."""

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    axis: int
    train: slice
    test: slice
    resolution: int

    def slab(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """``(image, labels)`` of the "train" or "test" slab."""
        if which not in ("train", "test"):
            raise ValueError(f"which must be 'train' or 'test', got {which!r}")
        sl = [slice(None)] * 3
        sl[self.axis] = self.train if which == "train" else self.test
        return self.image[tuple(sl)], self.labels[tuple(sl)]


def load_mni_task(resolution: int = 4, axis: int = 1, gap: int = 4) -> MniTask:
    """The MNI152 task (needs nilearn: ``pip install 'attnkit[data]'``; no download)."""
    try:
        from nilearn import datasets
    except ImportError as e:
        raise ImportError("the MNI152 task needs nilearn: pip install 'attnkit[data]'") from e
    from .nifti import load_nifti

    t1 = load_nifti(datasets.load_mni152_template(resolution=resolution), nan_policy="zero")
    gm = load_nifti(datasets.load_mni152_gm_template(resolution=resolution)).data
    wm = load_nifti(datasets.load_mni152_wm_template(resolution=resolution)).data
    brain = load_nifti(datasets.load_mni152_brain_mask(resolution=resolution)).data > 0.5
    if not (t1.data.shape == gm.shape == wm.shape == brain.shape):
        raise ValueError(f"MNI152 maps disagree in shape: T1 {t1.data.shape}, GM {gm.shape}, "
                         f"WM {wm.shape}, mask {brain.shape}")
    train, test = split_slabs(t1.data.shape[axis], gap)
    return MniTask(t1.data, tissue_labels(gm, wm, brain), t1.affine, axis, train, test,
                   resolution)


def augment_intensity(volume: np.ndarray, rng: np.random.Generator, *,
                      bias: float = 0.3, gamma: tuple[float, float] = (0.7, 1.5),
                      noise: float = 0.05) -> np.ndarray:
    """A scanner-like intensity change of ``volume (*spatial)`` (values ~[0, 1]):
    ``gain * (v ** gamma) * exp(field) + offset + noise``, with ``field`` a random smooth
    (quadratic) function of position of amplitude ``bias``, ``gamma`` log-uniform in the range,
    gain in [0.7, 1.3], offset in [-0.1, 0.1] and Gaussian noise of std ``noise``."""
    v = np.clip(volume.astype(np.float64), 0.0, None)
    axes = [np.linspace(-1, 1, s) for s in v.shape]
    grid = np.meshgrid(*axes, indexing="ij")
    field = sum(rng.uniform(-1, 1) * g for g in grid)
    field = field + sum(rng.uniform(-1, 1) * g * h for i, g in enumerate(grid)
                        for h in grid[i:])
    field = bias * field / max(np.abs(field).max(), 1e-12)
    g = float(np.exp(rng.uniform(np.log(gamma[0]), np.log(gamma[1]))))
    out = rng.uniform(0.7, 1.3) * v**g * np.exp(field) + rng.uniform(-0.1, 0.1)
    out = out + rng.normal(0.0, noise, v.shape)
    return out.astype(np.float32)


def sample_patches(image: np.ndarray, labels: np.ndarray, size: int, n: int,
                   rng: np.random.Generator, min_foreground: float = 0.2
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random cubes of side ``size`` from ``image``/``labels`` (same shape), each with at
    least ``min_foreground`` of its voxels inside the brain (label > 0) when possible."""
    if image.shape != labels.shape:
        raise ValueError(f"image and labels must have one shape, got {image.shape} and "
                         f"{labels.shape}")
    if any(s < size for s in image.shape):
        raise ValueError(f"patch side {size} exceeds the volume {image.shape}")
    xs, ys = [], []
    for _ in range(n):
        for _attempt in range(20):
            corner = [int(rng.integers(0, s - size + 1)) for s in image.shape]
            sl = tuple(slice(c, c + size) for c in corner)
            if (labels[sl] > 0).mean() >= min_foreground:
                break
        xs.append(image[sl])
        ys.append(labels[sl])
    return np.stack(xs), np.stack(ys)
