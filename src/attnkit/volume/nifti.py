"""NIfTI volumes through the optional ``nibabel`` (``pip install attnkit[data]``).

:func:`load_nifti` reads a 3D volume (from a path or an in-memory nibabel image) and returns a
:class:`NiftiVolume` (data, spacing, affine), which still unpacks as the older
``volume, spacing = load_nifti(path)``; :func:`save_nifti` writes an array (e.g. a predicted
segmentation) with the affine of the scan it belongs to, so a viewer overlays the two.
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import check_positive_int

__all__ = ["load_nifti", "save_nifti", "NiftiVolume", "example_nifti_path"]


@dataclass
class NiftiVolume:
    """A loaded 3D volume: ``data (X, Y, Z)`` float32, ``spacing (sx, sy, sz)`` in mm and the
    ``affine (4, 4)`` voxel-to-world matrix. Unpacks as ``data, spacing`` (the older return
    value of :func:`load_nifti`); ``source`` names where it came from (for messages)."""

    data: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    source: str = ""

    def __iter__(self):  # ``volume, spacing = load_nifti(path)`` keeps working
        return iter((self.data, self.spacing))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        return (self.data, self.spacing)[i]

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


def load_nifti(path: str | Path | Any, *, nan_policy: str = "raise",
               max_bytes: int = DEFAULT_MAX_BYTES) -> NiftiVolume:
    """Read a 3D NIfTI volume.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file, or an in-memory nibabel image (e.g.
            ``nibabel.load(...)`` or one of nilearn's templates; named ``<nibabel image>``
            in messages unless it has a file name).
        nan_policy: "raise" (ValueError on NaN/inf voxels) or "zero" (replace them by 0).
        max_bytes: the volume the header declares may take at most this many bytes as
            float32, checked before the voxels are read (:data:`DEFAULT_MAX_BYTES`).

    Returns:
        :class:`NiftiVolume` with ``data (X, Y, Z) float32``, ``spacing (sx, sy, sz)`` in mm
        and ``affine (4, 4)``; it unpacks as ``volume, spacing``. A 4D file with one volume
        (``(X, Y, Z, 1)``) is squeezed.

    Raises:
        FileNotFoundError: no such file. ValueError: anything wrong with the file (a directory,
            not NIfTI, a damaged header or truncated data, not 3D, too large, NaN voxels); every
            message starts with the file's path.
    """
    if nan_policy not in ("raise", "zero"):
        raise ValueError(f"nan_policy must be 'raise' or 'zero', got {nan_policy!r}")
    check_positive_int("max_bytes", max_bytes)
    if not isinstance(path, (str, os.PathLike)):
        if not (hasattr(path, "header") and hasattr(path, "get_fdata")
                and hasattr(path, "affine")):
            raise TypeError(f"path must be a file path or a nibabel image, got "
                            f"{type(path).__name__}")
        img = path
        name = img.get_filename() if hasattr(img, "get_filename") else None
        return _read_image(img, name or "<nibabel image>", nan_policy, max_bytes)
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
    errors = _nibabel_errors()
    try:
        img = nibabel.load(str(path))
        shape = tuple(int(x) for x in img.header.get_data_shape())
    except errors as e:  # nibabel's messages rarely name the file
        raise ValueError(f"{path}: cannot read the NIfTI header ({type(e).__name__}: {e})") from e
    return _read_image(img, str(path), nan_policy, max_bytes, shape)


def _nibabel_errors() -> tuple[type[BaseException], ...]:
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    return (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError)


def _read_image(img: Any, path: str, nan_policy: str, max_bytes: int,
                shape: tuple[int, ...] | None = None) -> NiftiVolume:
    """The voxels, spacing and affine of an opened nibabel image; messages start with ``path``."""
    errors = _nibabel_errors()
    if shape is None:
        shape = tuple(int(x) for x in img.shape)
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
    affine = np.asarray(img.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"{path}: the affine must be a finite 4x4 matrix, got "
                         f"{affine.shape if affine.shape != (4, 4) else 'non-finite values'}")
    return NiftiVolume(data, spacing, affine, path)


def save_nifti(path: str | Path, array: np.ndarray, like: Any = None, *,
               affine: np.ndarray | None = None) -> Path:
    """Write a 3D ``array (X, Y, Z)`` as NIfTI-1 (``.nii`` or ``.nii.gz``), atomically.

    Args:
        path: the file to write (its name must end in ``.nii`` or ``.nii.gz``).
        array: the voxels, e.g. a predicted label map; integer arrays are stored as int16/int32
            (labels stay exact), bool as uint8, floats as float32.
        like: the scan the array belongs to: a :class:`NiftiVolume`, a nibabel image or a
            NIfTI path; its affine (and its shape, which ``array`` must match) is used, so a
            viewer shows the two in register.
        affine: a ``(4, 4)`` affine instead of ``like`` (default: identity when neither).

    Returns:
        the path written. The file appears complete or not at all (temp file + rename).
    """
    try:
        import nibabel
    except ImportError as e:
        raise ImportError("writing NIfTI needs nibabel: pip install 'attnkit[data]'") from e
    path = Path(path)
    if not path.name.endswith(_SUFFIXES):
        raise ValueError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    array = np.asarray(array)
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"{path}: array must be a non-empty 3D volume (X, Y, Z), got shape "
                         f"{array.shape}")
    if like is not None and affine is not None:
        raise ValueError("give like= or affine=, not both")
    if like is not None:
        ref = like if isinstance(like, NiftiVolume) else load_nifti(like, nan_policy="zero")
        if tuple(ref.data.shape) != tuple(array.shape):
            raise ValueError(f"{path}: array shape {array.shape} does not match the shape "
                             f"{ref.data.shape} of like={ref.source or type(like).__name__}")
        affine = ref.affine
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"affine must be a finite (4, 4) matrix, got shape {affine.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        small = array.min() >= -2**15 and array.max() < 2**15
        array = array.astype(np.int16 if small else np.int32)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{path}: array has NaN or infinite values")
        array = array.astype(np.float32)
    else:
        raise TypeError(f"{path}: array must be numeric or bool, got dtype {array.dtype}")
    img = nibabel.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        nibabel.save(img, tmp)
        umask = os.umask(0)  # mkstemp makes the file 0600: give it the usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def example_nifti_path() -> Path | None:
    """nibabel's bundled real MRI volume ``anatomical.nii`` (33x41x25), or None without it."""
    try:
        import nibabel
    except ImportError:
        return None
    path = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    return path if path.is_file() else None
