"""NIfTI volumes through the optional ``nibabel`` (``pip install attnkit[data]``)."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np

__all__ = ["load_nifti", "example_nifti_path"]

_SUFFIXES = (".nii", ".nii.gz")
# NIfTI-1 header: sizeof_hdr 348 at byte 0, magic "n+1\0"/"ni1\0" at 344; NIfTI-2: 540, at 4.
_MAGICS = {348: (344, (b"n+1\x00", b"ni1\x00")), 540: (4, (b"n+2\x00", b"ni2\x00"))}


def _looks_like_nifti(path: Path) -> bool:
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(548)
    except OSError:  # e.g. a .gz that is not gzip
        return False
    if len(head) < 348:
        return False
    for order in ("<", ">"):
        size = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0])
        if size in _MAGICS:
            at, magics = _MAGICS[size]
            return len(head) >= at + 4 and head[at:at + 4] in magics
    return False


#: Default limit of :func:`load_nifti`: the float32 volume may take 2 GiB (512**3 voxels).
DEFAULT_MAX_BYTES = 1 << 31


def load_nifti(path: str | Path, *, nan_policy: str = "raise",
               max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[np.ndarray, tuple]:
    """Read a 3D NIfTI volume.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        nan_policy: "raise" (ValueError on NaN/inf voxels) or "zero" (replace them by 0).
        max_bytes: the volume the header declares may take at most this many bytes as
            float32, checked before the voxels are read (:data:`DEFAULT_MAX_BYTES`).

    Returns:
        ``(volume (X, Y, Z) float32, spacing (sx, sy, sz) in mm)``. A 4D file with one volume
        (``(X, Y, Z, 1)``) is squeezed.

    Raises:
        FileNotFoundError: no such file. ValueError: anything wrong with the file (a directory,
            not NIfTI, a damaged header or truncated data, not 3D, too large, NaN voxels); every
            message starts with the file's path.
    """
    if nan_policy not in ("raise", "zero"):
        raise ValueError(f"nan_policy must be 'raise' or 'zero', got {nan_policy!r}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected a .nii or .nii.gz file")
    if not path.is_file():
        raise FileNotFoundError(f"no such NIfTI file: {path}")
    if not path.name.endswith(_SUFFIXES):
        raise ValueError(f"{path}: not a NIfTI file (expected a .nii or .nii.gz name)")
    if not _looks_like_nifti(path):
        raise ValueError(f"{path}: not a NIfTI file (no NIfTI-1/2 header magic)")
    try:
        import nibabel
    except ImportError as e:
        raise ImportError("reading NIfTI needs nibabel: pip install 'attnkit[data]'") from e
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    errors = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError)
    try:
        img = nibabel.load(str(path))
        shape = tuple(int(x) for x in img.header.get_data_shape())
    except errors as e:  # nibabel's messages rarely name the file
        raise ValueError(f"{path}: cannot read the NIfTI header ({type(e).__name__}: {e})") from e
    if math.prod(shape) * 4 > max_bytes:
        raise ValueError(f"{path}: the header declares shape {shape}, {math.prod(shape) * 4} "
                         f"bytes as float32, over max_bytes={max_bytes}")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except errors as e:
        raise ValueError(f"{path}: cannot read the NIfTI voxels ({type(e).__name__}: {e})") from e
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    bad = ~np.isfinite(data)
    if bad.any():
        if nan_policy == "raise":
            raise ValueError(f"{path}: {int(bad.sum())} NaN or infinite voxel(s); "
                             "use nan_policy='zero' to replace them")
        data = np.where(bad, np.float32(0), data)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data, spacing


def example_nifti_path() -> Path | None:
    """nibabel's bundled real MRI volume ``anatomical.nii`` (33x41x25), or None without it."""
    try:
        import nibabel
    except ImportError:
        return None
    path = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    return path if path.is_file() else None
