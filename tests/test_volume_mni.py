"""Issue 21: the MNI152 tissue task, Dice, the matched U-Net and the NIfTI round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnkit.volume import NiftiVolume, load_nifti, save_nifti
from attnkit.volume.experiment import dice_per_class, make_segmenters
from attnkit.volume.mni import (
    augment_intensity,
    nilearn_available,
    sample_patches,
    split_slabs,
    tissue_labels,
)
from attnkit.volume.model import UNet3D, count_parameters


def test_tissue_labels_by_hand():
    gm = np.array([[[0.6, 0.1, 0.2, 0.0]]])
    wm = np.array([[[0.3, 0.7, 0.1, 0.0]]])
    brain = np.array([[[True, True, True, False]]])
    # other = 1 - gm - wm = 0.1, 0.2, 0.7, 1.0 -> gm, wm, other, (outside: background)
    assert tissue_labels(gm, wm, brain).tolist() == [[[2, 3, 1, 0]]]
    with pytest.raises(ValueError, match="one shape"):
        tissue_labels(gm, wm[..., :2], brain)


def test_split_slabs_disjoint_with_gap():
    for length, gap in ((59, 4), (10, 0), (117, 7)):
        train, test = split_slabs(length, gap)
        a, b = set(range(length)[train]), set(range(length)[test])
        assert a and b and not a & b
        assert min(b) - max(a) - 1 >= gap
    with pytest.raises(ValueError, match="gap"):
        split_slabs(10, -1)
    with pytest.raises(ValueError, match="cannot hold"):
        split_slabs(5, 4)


@pytest.mark.skipif(not nilearn_available(), reason="nilearn (optional) is not installed")
def test_mni_task_split_has_no_overlapping_voxels():
    from attnkit.volume.mni import load_mni_task

    task = load_mni_task(resolution=4)
    assert task.image.shape == task.labels.shape == (50, 59, 48)
    assert set(np.unique(task.labels)) == {0, 1, 2, 3}
    assert task.affine.shape == (4, 4) and np.allclose(np.diag(task.affine)[:3], 4)
    coords = np.indices(task.image.shape)[task.axis]
    train_idx = set(np.unique(coords[tuple(_slab(task, task.train))]))
    test_idx = set(np.unique(coords[tuple(_slab(task, task.test))]))
    assert not train_idx & test_idx and min(test_idx) - max(train_idx) > 4
    img, lab = task.slab("train")
    assert img.shape[task.axis] + task.slab("test")[0].shape[task.axis] + 4 == 59
    x, y = sample_patches(img, lab, 12, 3, np.random.default_rng(0))
    assert x.shape == y.shape == (3, 12, 12, 12) and ((y > 0).mean((1, 2, 3)) >= 0.2).all()


def _slab(task, sl):
    out = [slice(None)] * 3
    out[task.axis] = sl
    return out


def test_dice_matches_hand_computation():
    pred = torch.tensor([0, 1, 1, 2, 2, 2, 3, 0])
    target = torch.tensor([0, 1, 2, 2, 2, 0, 0, 0])
    # class 1: |P&T| = 1, |P| = 2, |T| = 1 -> 2/3; class 2: 2, 3, 3 -> 4/6; class 3: 0, 1, 0 -> 0
    d = dice_per_class(pred, target, 5)
    assert d[:3] == pytest.approx([2 / 3, 4 / 6, 0.0]) and np.isnan(d[3])  # class 4 absent
    with pytest.raises(ValueError, match="one shape"):
        dice_per_class(pred, target[:4], 4)


def test_augment_intensity_and_patch_errors():
    vol = np.random.default_rng(0).random((8, 9, 10)).astype(np.float32)
    a = augment_intensity(vol, np.random.default_rng(1))
    b = augment_intensity(vol, np.random.default_rng(1))
    assert a.shape == vol.shape and np.array_equal(a, b) and not np.allclose(a, vol)
    with pytest.raises(ValueError, match="one shape"):
        sample_patches(vol, np.zeros((8, 9, 9), np.int64), 4, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="exceeds"):
        sample_patches(vol, np.zeros(vol.shape, np.int64), 12, 1, np.random.default_rng(0))


def test_unet_shapes_and_matched_parameters():
    torch.manual_seed(0)
    axial, unet = make_segmenters(4, 16, 12)
    na, nu = count_parameters(axial), count_parameters(unet)
    assert abs(na - nu) <= min(abs(na - count_parameters(UNet3D(1, 4, w)))
                               for w in range(1, 12))
    x = torch.randn(2, 10, 7, 13)  # not multiples of 4: padded and cropped back
    out = unet(x)
    assert out.shape == (2, 10, 7, 13, 4)
    assert axial(x).shape == out.shape
    with pytest.raises(ValueError, match="channels last"):
        unet(torch.randn(2, 1, 8, 8, 8, 3))


def test_unet_odd_sizes_align_and_bad_design_rejected():
    torch.manual_seed(0)
    for levels in (1, 2):
        unet = UNet3D(1, 4, 4, levels).eval()
        x = torch.randn(1, 9, 6, 11)
        out = unet(x)
        assert out.shape == (1, 9, 6, 11, 4)
        # cropping keeps voxel (i, j, k) at (i, j, k): the same as predicting the padded volume
        m = 2**levels
        pad = (0, -11 % m, 0, -6 % m, 0, -9 % m)
        full = torch.nn.functional.pad(x[:, None], pad, mode="replicate")[:, 0]
        with torch.no_grad():
            assert torch.allclose(out, unet(full)[:, :9, :6, :11], atol=1e-5)
    with pytest.raises(ValueError, match="norm must be one of"):
        UNet3D(1, 4, 4, norm="layer")
    with pytest.raises(ValueError, match="levels"):
        UNet3D(1, 4, 4, levels=0)


def test_instance_norm_unet_cannot_see_patch_brightness():
    """Why the baseline has no per-sample norm: with instance norm a patch and a brighter copy
    (bright white matter vs darker grey) give the same output, whatever the weights."""
    torch.manual_seed(0)
    x = 0.5 + 0.2 * torch.randn(1, 12, 12, 12)
    inst = UNet3D(1, 4, 6, norm="instance").eval()
    with torch.no_grad():
        for p in inst.parameters():
            if p.dim() == 1:  # non-trivial norm affine parameters
                p.add_(0.3 * torch.randn_like(p))
        assert torch.allclose(inst(x), inst(2.5 * x), atol=1e-3)


def _train_on_intensity_bands(norm: str, steps: int = 150) -> list[float]:
    from scipy.ndimage import gaussian_filter

    from attnkit.volume.experiment import predict_tiled

    rng = np.random.default_rng(0)
    vol = gaussian_filter(rng.normal(size=(40, 40, 40)), 3.0)
    vol = (vol - vol.mean()) / vol.std()
    lab = np.digitize(vol, np.quantile(vol, [0.25, 0.5, 0.75]))
    x_all, y_all = torch.from_numpy(vol).float(), torch.from_numpy(lab)
    torch.manual_seed(0)
    unet = UNet3D(1, 4, 6, norm=norm)
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    for _ in range(steps):
        c = rng.integers(0, 32, (4, 3))
        xb = torch.stack([x_all[a:a + 8, b:b + 8, d:d + 8] for a, b, d in c])
        yb = torch.stack([y_all[a:a + 8, b:b + 8, d:d + 8] for a, b, d in c])
        loss = torch.nn.functional.cross_entropy(unet(xb).reshape(-1, 4), yb.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    pred = predict_tiled(unet, x_all[None, :32, :32, :32], 8)[0]  # 8^3 tiles, as trained
    return dice_per_class(pred, y_all[:32, :32, :32], 4)


def test_unet_learns_intensity_tissue_task():
    """A competent baseline segments a smooth volume whose labels are intensity bands (what T1
    tissue labels mostly are) from small patches; the instance-norm variant, blind to each
    patch's brightness, does clearly worse (the cause of the old baseline's failure)."""
    dice = _train_on_intensity_bands("batch")
    assert min(dice) > 0.6 and np.mean(dice) > 0.75, dice
    inst = _train_on_intensity_bands("instance")
    assert np.mean(inst) < np.mean(dice) - 0.1, (inst, dice)


def test_nifti_round_trip_keeps_data_and_affine(tmp_path):
    nib = pytest.importorskip("nibabel")
    affine = np.array([[-2.0, 0.1, 0, 90], [0, 2.5, 0, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]])
    scan = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    scan_path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(scan, affine), scan_path)
    vol = load_nifti(scan_path)
    assert isinstance(vol, NiftiVolume) and np.array_equal(vol.data, scan)
    assert np.allclose(vol.affine, affine) and vol.spacing == pytest.approx(
        tuple(np.linalg.norm(affine[:3, :3], axis=0)))
    data, spacing = load_nifti(scan_path)  # the older two-value form still unpacks
    assert np.array_equal(data, scan) and spacing == vol.spacing
    labels = np.random.default_rng(1).integers(0, 4, (6, 5, 4))
    for like in (vol, scan_path, nib.load(scan_path)):
        out = save_nifti(tmp_path / "pred.nii.gz", labels, like=like)
        back = load_nifti(out)
        assert np.array_equal(back.data, labels) and np.allclose(back.affine, affine)
        assert nib.load(out).get_data_dtype() == np.int16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.nii.gz", "scan.nii.gz"]
    # a nibabel image in memory (e.g. nilearn's templates) loads too
    mem = load_nifti(nib.Nifti1Image(scan, affine))
    assert np.array_equal(mem.data, scan) and mem.source == "<nibabel image>"
    plain = save_nifti(tmp_path / "plain.nii", scan * 2)
    assert np.allclose(load_nifti(plain).affine, np.eye(4))
    with pytest.raises(ValueError, match=r"shape \(5, 5, 4\) does not match"):
        save_nifti(tmp_path / "bad.nii.gz", labels[:5], like=vol)
    with pytest.raises(ValueError, match="3D volume"):
        save_nifti(tmp_path / "bad.nii.gz", labels[..., None], like=vol)
    with pytest.raises(ValueError, match="must end in"):
        save_nifti(tmp_path / "bad.npy", labels)
    with pytest.raises(ValueError, match="NaN"):
        save_nifti(tmp_path / "bad.nii", np.full((2, 2, 2), np.nan))
    with pytest.raises(TypeError, match="file path or a nibabel image"):
        load_nifti(42)
    assert not (tmp_path / "bad.nii.gz").exists() and not (tmp_path / "bad.nii").exists()


def test_nifti_bad_files_name_the_file(tmp_path):
    nib = pytest.importorskip("nibabel")
    data = np.ones((4, 4, 4), np.float32)
    data[0, 0, 0] = np.nan
    cases = {}
    cases["nan.nii"] = nib.Nifti1Image(data, np.eye(4))
    cases["four.nii"] = nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.float32), np.eye(4))
    for name, img in cases.items():
        nib.save(img, tmp_path / name)
    good = tmp_path / "good.nii"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), good)
    raw = good.read_bytes()
    (tmp_path / "truncated.nii").write_bytes(raw[:600])
    (tmp_path / "magic.nii").write_bytes(raw[:344] + b"xyz\x00" + raw[348:])
    expect = {"nan.nii": "NaN", "four.nii": "3D volume", "truncated.nii": "cannot read",
              "magic.nii": "no NIfTI-1/2 header magic"}
    for name, what in expect.items():
        path = tmp_path / name
        with pytest.raises(ValueError, match=what) as e:
            load_nifti(path)
        assert str(e.value).startswith(str(path)), e.value
    with pytest.raises(ValueError, match=r"^<nibabel image>: 1 NaN"):
        load_nifti(nib.Nifti1Image(data, np.eye(4)))


def test_phantom_fallback_trains_and_evaluates():
    from attnkit.experiment import RunContext
    from attnkit.volume.experiment import PhantomData, evaluate, train_on

    data = PhantomData(side=8, n_train=2, n_test=1)
    torch.manual_seed(0)
    axial, unet = make_segmenters(len(data.class_names), 8, 8)
    ctx = RunContext(quick=True, out_dir=None)
    for model in (axial, unet):
        train_on(ctx, model, data, steps=1, seed=0)
        dice, pred = evaluate(model, data, 8)
        assert len(dice) == 3 and pred.shape == (8, 8, 8)
    # tiles: the same labels as predicting each tile alone; sizes not multiples of the tile
    from attnkit.volume.experiment import predict_tiled

    x = torch.randn(1, 19, 8, 5)
    out = predict_tiled(unet, x, 8)
    assert out.shape == (1, 19, 8, 5)
    with torch.no_grad():  # the middle tile: its own prediction on the edge-padded volume
        full = torch.nn.functional.pad(x.unsqueeze(1), (0, 3, 0, 0, 0, 5), mode="replicate")[:, 0]
        assert torch.equal(out[:, 8:16], unet(full[:, 8:16]).argmax(-1)[..., :5])
