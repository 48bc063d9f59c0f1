"""Image data: the embedded handwritten digits, and loaders for users' image folders / arrays.

The digits are scikit-learn's ``load_digits`` (1,797 grayscale 8x8 images, values 0..16; UCI
optical recognition of handwritten digits), stored once in ``data/digits.npz`` with a fixed
stratified 80/20 train/test split (seed 0), so no download and no scikit-learn at run time.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["load_digits", "load_images", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".pgm", ".ppm")


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The embedded digits: ``images (N, 1, 8, 8)`` float32 in ``[0, 1]``, ``labels (N,)`` int64.

    ``split`` is "train" (1,438 images), "test" (359) or "all" (1,797).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    with resources.files(__package__).joinpath("data/digits.npz").open("rb") as f:
        with np.load(f, allow_pickle=False) as z:
            images, labels, is_test = z["images"], z["labels"], z["is_test"]
    keep = np.ones(len(labels), bool) if split == "all" else (is_test if split == "test"
                                                              else ~is_test)
    x = images[keep].astype(np.float32)[:, None] / 16.0
    return x, labels[keep].astype(np.int64)


def _as_nchw(array: np.ndarray, channels_last: bool | None) -> np.ndarray:
    """``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` -> float32 ``(N, C, H, W)``."""
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == bool
    ):
        raise TypeError(f"images must be a numeric array, got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4:
        if channels_last is None:  # guess: a small trailing axis is the channel axis
            channels_last = array.shape[-1] in (1, 3, 4) and array.shape[1] not in (1, 3, 4)
        if channels_last:
            array = np.moveaxis(array, -1, 1)
    else:
        raise ValueError(
            "images must have shape (N, H, W), (N, C, H, W) or (N, H, W, C), "
            f"got {array.ndim} dims {array.shape}"
        )
    if 0 in array.shape:
        raise ValueError(f"images must not be empty, got shape {array.shape}")
    out = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(out).all():
        raise ValueError("images contain NaN or infinite values")
    return out


def load_images(
    source: str | Path | np.ndarray,
    *,
    labels: np.ndarray | None = None,
    channels_last: bool | None = None,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Load users' images as ``(images (N, C, H, W) float32, labels (N,) int64 or None, classes)``.

    ``source`` may be:
      * a NumPy array ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` (``labels`` optional);
      * a ``.npy`` file (an array as above) or ``.npz`` file with arrays ``images`` and
        optionally ``labels`` (read with ``allow_pickle=False``: no code from the file runs);
      * a directory of class sub-folders (``root/<class>/<image>``, sorted class names become
        labels 0..K-1) or of images directly (no labels). Needs Pillow; all images must have
        one size.

    ``scale`` divides the pixel values (default: 255 for 8-bit files/arrays, else 1).
    """
    classes: list[str] = []
    if isinstance(source, np.ndarray):
        array = source
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        if path.is_dir():
            array, labels, classes = _read_folder(path)
            channels_last = False  # _read_folder returns (N, C, H, W)
        elif path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "images" not in z:
                    raise ValueError(f"{path} must hold an array named 'images', has {z.files}")
                array = z["images"]
                if labels is None and "labels" in z:
                    labels = z["labels"]
        else:
            raise ValueError(f"{path}: expected a directory, .npy or .npz file")
    if scale is None:
        scale = 255.0 if array.dtype == np.uint8 else 1.0
    images = _as_nchw(np.asarray(array), channels_last) / np.float32(scale)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be integers of shape ({len(images)},), got {labels.dtype} "
                f"{labels.shape}"
            )
        labels = labels.astype(np.int64)
    return images, labels, classes


def _read_folder(root: Path) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    try:
        from PIL import Image
    except ImportError as e:  # Pillow is optional (it comes with matplotlib)
        raise ImportError("reading an image folder needs Pillow: pip install pillow") from e
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    groups = [(d.name, d) for d in subdirs] if subdirs else [("", root)]
    arrays, labels, classes = [], [], []
    for name, folder in groups:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            continue
        classes.append(name)
        for f in files:
            with Image.open(f) as im:
                im = im.convert("L") if im.mode in ("1", "L", "P", "I;16", "I", "F") else \
                    im.convert("RGB")
                arr = np.asarray(im)
            arrays.append(arr if arr.ndim == 3 else arr[..., None])
            labels.append(len(classes) - 1)
    if not arrays:
        raise ValueError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images in {root} have different sizes {sorted(shapes)}; resize first")
    images = np.stack(arrays)  # (N, H, W, C)
    images = np.moveaxis(images, -1, 1)
    return images, (np.asarray(labels) if subdirs else None), classes if subdirs else []
