"""Volumes: phantoms, the axial segmenter (shapes, padding, bad input), the NIfTI loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnkit.volume import (
    NUM_CLASSES,
    AxialVolumeTransformer,
    example_nifti_path,
    load_nifti,
    make_phantom,
    make_phantoms,
    normalize_volume,
    pad_volumes,
)


def test_phantom_labels_intensities_and_determinism():
    vol, lab = make_phantom((20, 18, 16), rng=3)
    assert vol.shape == lab.shape == (20, 18, 16) and vol.dtype == np.float32
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    # The shell encloses the tissue: no tissue voxel on the volume border.
    border = np.ones(lab.shape, bool)
    border[1:-1, 1:-1, 1:-1] = False
    assert not (lab[border] == 2).any()
    # Without noise and jitter each tissue has one intensity.
    clean, lab2 = make_phantom(16, rng=1, noise=0.0, intensity_jitter=False)
    for c in range(4):
        assert np.ptp(clean[lab2 == c]) < 1e-6 or c == 3  # lesions may differ from each other
    v2, l2 = make_phantom((20, 18, 16), rng=3)
    assert np.array_equal(vol, v2) and np.array_equal(lab, l2)
    xs, ys = make_phantoms(3, (8, 8), seed=0)  # 2D works too
    assert xs.shape == ys.shape == (3, 8, 8)
    with pytest.raises(ValueError, match="2 or 3 axes"):
        make_phantom((8, 8, 8, 8))


def test_segmenter_shapes_maps_and_scalar_input():
    torch.manual_seed(0)
    model = AxialVolumeTransformer(1, NUM_CLASSES, dim=8, depth=2, num_heads=2)
    x = torch.randn(2, 5, 6, 4)
    logits = model(x)  # (B, *spatial) accepted for one channel
    assert logits.shape == (2, 5, 6, 4, NUM_CLASSES)
    torch.testing.assert_close(logits, model(x.unsqueeze(-1)))
    logits, maps = model(x.unsqueeze(-1), need_weights=True)
    assert len(maps) == 2 and [w.shape[-1] for w in maps[0].per_axis] == [5, 6, 4]
    assert maps[0].effective.shape == (2, 5, 6, 4)


def test_padding_mask_gives_the_unpadded_result():
    torch.manual_seed(1)
    model = AxialVolumeTransformer(1, 3, dim=8, depth=2, num_heads=2, rel_pos_max_distance=3)
    a, b = torch.randn(4, 5, 3), torch.randn(3, 6, 5)
    batch, mask = pad_volumes([a, b], value=float("nan"))  # padded voxels may hold anything
    assert batch.shape == (2, 4, 6, 5) and mask.sum() == a.numel() + b.numel()
    out = model(batch, mask)
    torch.testing.assert_close(out[0, :4, :5, :3], model(a[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :3, :6, :5], model(b[None])[0], atol=1e-5, rtol=1e-5)


def test_segmenter_bad_input():
    model = AxialVolumeTransformer(2, 3, dim=8, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="channels last"):
        model(torch.randn(1, 4, 4, 2))  # rank of a 2D image for a 3D model
    with pytest.raises(ValueError, match="2 channel"):
        model(torch.randn(1, 4, 4, 4, 3))
    x = torch.randn(1, 4, 4, 4, 2)
    x[0, 1, 2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        model(x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        model(np.zeros((1, 4, 4, 4, 2)))


def test_normalize_volume_undoes_gain_and_offset():
    x = torch.randn(2, 6, 6, 6)
    y = normalize_volume(3.0 * x + 5.0)
    torch.testing.assert_close(y, normalize_volume(x), atol=1e-5, rtol=1e-5)
    mask = torch.rand(2, 6, 6, 6) > 0.5
    z = normalize_volume(x, mask)
    assert abs(float(z[0][mask[0]].mean())) < 1e-5


def test_load_nifti_real_volume():
    path = example_nifti_path()
    if path is None:
        pytest.skip("nibabel (optional) is not installed")
    vol, spacing = load_nifti(path)
    assert vol.shape == (33, 41, 25) and vol.dtype == np.float32
    assert len(spacing) == 3 and all(s > 0 for s in spacing)
    assert np.isfinite(vol).all() and vol.std() > 0


def test_load_nifti_bad_files(tmp_path):
    nib = pytest.importorskip("nibabel")
    text = tmp_path / "notes.nii"
    text.write_text("this is not an image\n" * 30)
    with pytest.raises(ValueError, match="not a NIfTI"):
        load_nifti(text)
    other = tmp_path / "volume.npy"
    np.save(other, np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="not a NIfTI"):
        load_nifti(other)
    with pytest.raises(FileNotFoundError):
        load_nifti(tmp_path / "missing.nii")
    data = np.ones((4, 5, 6), np.float32)
    data[1, 2, 3] = np.nan
    nan_path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.5, 3.0, 1.0])), nan_path)
    with pytest.raises(ValueError, match="1 NaN"):
        load_nifti(nan_path)
    vol, spacing = load_nifti(nan_path, nan_policy="zero")
    assert vol[1, 2, 3] == 0 and spacing == (1.0, 1.5, 3.0)
    four = tmp_path / "series.nii"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.float32), np.eye(4)), four)
    with pytest.raises(ValueError, match="3D volume"):
        load_nifti(four)


def test_load_nifti_errors_name_the_file(tmp_path):
    """nibabel's own errors (truncated data, bad header codes) came without the path."""
    nib = pytest.importorskip("nibabel")
    good = tmp_path / "good.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), good)
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(raw[:400])
    bad_code = tmp_path / "badcode.nii"
    bad_code.write_bytes(raw[:70] + b"\x07\x00" + raw[72:])  # datatype 7: no such code
    for path in (truncated, bad_code):
        with pytest.raises(ValueError) as e:
            load_nifti(path)
        assert str(e.value).startswith(f"{path}: cannot read the NIfTI")
    with pytest.raises(ValueError, match="is a directory"):
        load_nifti(tmp_path)
    with pytest.raises(ValueError, match=r"good\.nii: the header declares shape \(4, 4, 4\).*"
                                         r"max_bytes=100"):
        load_nifti(good, max_bytes=100)
    assert load_nifti(good)[0].shape == (4, 4, 4)
