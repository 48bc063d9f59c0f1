"""Volumes: axial-attention segmentation, 3D Shepp-Logan-style phantoms, NIfTI loading."""

from __future__ import annotations

from .model import AxialVolumeTransformer, normalize_volume, pad_volumes
from .nifti import NiftiVolume, example_nifti_path, load_nifti, save_nifti
from .phantom import CLASS_NAMES, NUM_CLASSES, make_phantom, make_phantoms

__all__ = ["AxialVolumeTransformer", "normalize_volume", "pad_volumes", "load_nifti",
           "save_nifti", "NiftiVolume", "example_nifti_path", "make_phantom", "make_phantoms",
           "NUM_CLASSES", "CLASS_NAMES"]
