"""ViT shapes and maps, the brightness probe (exact-invariance case), digits and image loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnkit import dense_reference
from attnkit.vision import ViT, brightness_probe, js_divergence, load_digits, load_images


@pytest.mark.parametrize("norm", ["pre", "post", "none"])
def test_vit_shapes_and_maps(norm):
    torch.manual_seed(0)
    model = ViT(8, 4, 3, 5, dim=16, depth=3, num_heads=2, norm=norm)
    x = torch.randn(6, 3, 8, 8)
    logits = model(x)
    assert logits.shape == (6, 5)
    logits2, maps = model(x, need_weights=True)
    torch.testing.assert_close(logits, logits2, atol=1e-5, rtol=1e-5)
    assert len(maps) == 3 and all(m.shape == (6, 2, 4, 4) for m in maps)
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(6, 2, 4))


def test_vit_attention_matches_dense_reference():
    torch.manual_seed(1)
    model = ViT(8, 2, 1, 10, dim=8, depth=1, num_heads=2).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    _, maps = model(x, need_weights=True)
    block = model.blocks[0]
    h = model.patch_embed(model.patchify(x)) + model.pos_embed
    hn = block.norm1(h)
    q = block.attn.q_proj(hn).view(3, 16, 2, 4).transpose(1, 2)
    k = block.attn.k_proj(hn).view(3, 16, 2, 4).transpose(1, 2)
    _, ref = dense_reference(q, k, k)
    torch.testing.assert_close(maps[0], ref)


def test_patchify_order():
    model = ViT(4, 2, 1, 2, dim=4, depth=1, num_heads=1)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    patches = model.patchify(x)
    assert patches[0, 0].tolist() == [0, 1, 4, 5] and patches[0, 1].tolist() == [2, 3, 6, 7]
    assert patches[0, 2].tolist() == [8, 9, 12, 13]


def test_vit_bad_input():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        ViT(8, 3, 1, 10, 16, 1, 2)
    with pytest.raises(ValueError, match="norm"):
        ViT(8, 2, 1, 10, 16, 1, 2, norm="layer")
    model = ViT(8, 2, 1, 10, 16, 1, 2)
    with pytest.raises(ValueError, match="1 channel"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        model(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        model(torch.randn(2, 1, 9, 9))


def test_js_divergence_bounds():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(js_divergence(p, q), torch.tensor([0.0, 1.0], dtype=torch.float64))
    r = torch.tensor([0.25, 0.75])
    s = torch.tensor([0.75, 0.25])
    assert 0 < float(js_divergence(r, s)) < 1
    assert float(js_divergence(r, s)) == pytest.approx(float(js_divergence(s, r)))


def _qkv(model):
    attn = model.blocks[0].attn
    return attn.q_proj, attn.k_proj, attn.v_proj


def _bare(seed, zero_sum=False):
    torch.manual_seed(seed)
    model = ViT(8, 2, 1, 10, 16, 1, 2, "pre", patch_bias=False, pos_embedding=False).eval()
    model.blocks[0].norm1.eps = 1e-12  # exact up to rounding, not up to LayerNorm's eps
    with torch.no_grad():
        for proj in _qkv(model):  # sharper attention: changes are visible
            proj.weight *= 4
        if zero_sum:
            model.patch_embed.weight -= model.patch_embed.weight.mean(1, keepdim=True)
    return model


def test_probe_exact_invariance_hand_made_case():
    images = torch.rand(32, 1, 8, 8) + 0.5  # no all-zero patch
    # Depth 1, pre-LN, no patch bias, no position embedding: LayerNorm(c t) = LayerNorm(t).
    res = brightness_probe(_bare(0), images, (0.1, 0.3, 3.0), ())
    for row in res.rows:
        assert row["js_row_max"] < 1e-6  # (predictions need not agree: the residual path)
    # With zero-sum patch weights additive shifts vanish too (W (x + s 1) = W x).
    res = brightness_probe(_bare(0, zero_sum=True), images, (), (-0.3, 0.5))
    assert all(r["js_row_max"] < 1e-6 for r in res.rows)
    # The same model without zero-sum weights does see the shift, and no-LN sees the scale.
    assert brightness_probe(_bare(0), images, (), (0.5,)).rows[0]["js_mean"] > 1e-3
    torch.manual_seed(0)
    none = ViT(8, 2, 1, 10, 16, 1, 2, "none", patch_bias=False, pos_embedding=False).eval()
    with torch.no_grad():
        none.patch_embed.weight *= 10  # logits large enough that scale changes the softmax
    row = brightness_probe(none, images, (0.3,), ()).rows[0]
    assert row["js_mean"] > 1e-3
    # A patch bias breaks exactness.
    torch.manual_seed(0)
    biased = ViT(8, 2, 1, 10, 16, 1, 2, "pre", pos_embedding=False).eval()
    with torch.no_grad():
        biased.patch_embed.bias.normal_()
        for proj in _qkv(biased):
            proj.weight *= 4
    assert brightness_probe(biased, images, (0.3,), ()).rows[0]["js_mean"] > 1e-3


def test_probe_rows_and_bad_input():
    model = _bare(1)
    res = brightness_probe(model, np.random.rand(4, 1, 8, 8).astype(np.float32), (0.5,), (0.1,))
    assert [(r["kind"], r["value"]) for r in res.rows] == [("scale", 0.5), ("shift", 0.1)]
    assert res.js_per_head[0].shape == (1, 2)
    assert res.at("shift", 0.1) is res.rows[1]
    with pytest.raises(ValueError, match="> 0"):
        brightness_probe(model, torch.rand(2, 1, 8, 8), (0.0,), ())
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        brightness_probe(model, torch.rand(2, 8, 8), (0.5,), ())


def test_load_digits_split():
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    assert xtr.shape == (1438, 1, 8, 8) and xte.shape == (359, 1, 8, 8)
    assert xtr.dtype == np.float32 and 0.0 <= xtr.min() and xtr.max() <= 1.0
    assert set(np.unique(ytr)) == set(range(10)) == set(np.unique(yte))
    xall, _ = load_digits("all")
    assert len(xall) == 1797
    with pytest.raises(ValueError, match="split"):
        load_digits("val")


def test_load_images_arrays_files_and_folders(tmp_path):
    arr = np.random.randint(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    images, labels, classes = load_images(arr)
    assert images.shape == (5, 3, 6, 7) and labels is None and images.max() <= 1.0
    np.savez(tmp_path / "d.npz", images=arr[..., 0], labels=np.arange(5))
    images, labels, _ = load_images(tmp_path / "d.npz")
    assert images.shape == (5, 1, 6, 7) and labels.tolist() == [0, 1, 2, 3, 4]
    np.save(tmp_path / "d.npy", np.zeros((2, 1, 4, 4), np.float32))
    assert load_images(tmp_path / "d.npy")[0].shape == (2, 1, 4, 4)
    pil = pytest.importorskip("PIL.Image")
    for cls in ("cat", "dog"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(2):
            pil.fromarray(np.full((4, 5), 40 * i, np.uint8)).save(
                tmp_path / "folder" / cls / f"{i}.png")
    images, labels, classes = load_images(tmp_path / "folder")
    assert images.shape == (4, 1, 4, 5) and labels.tolist() == [0, 0, 1, 1]
    assert classes == ["cat", "dog"]


def test_load_images_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        load_images(np.zeros((4, 4)))
    with pytest.raises(TypeError, match="numeric"):
        load_images(np.array([["a"]] * 2, dtype=object).reshape(2, 1, 1))
    with pytest.raises(ValueError, match="NaN"):
        load_images(np.full((1, 2, 2), np.nan))
    with pytest.raises(ValueError, match="labels"):
        load_images(np.zeros((3, 2, 2)), labels=np.zeros(2, int))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="directory, .npy or .npz"):
        load_images(tmp_path / "x.txt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_images(tmp_path / "obj.npy")  # never unpickled


# ---------------------------------------------------------------- issue 21: arms and probes


def test_every_arm_builds_and_trains_a_step():
    from attnkit.experiment import RunContext
    from attnkit.vision.experiment import ARCH_QUICK, ARMS, make_model, train_vit

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    ctx = RunContext(quick=True, out_dir=None)
    for arm in ARMS:
        torch.manual_seed(3)
        before = {k: v.clone() for k, v in make_model(arm, ARCH_QUICK).state_dict().items()}
        model = train_vit(ctx, arm, x, y, epochs=1, seed=3, batch_size=8, steps=1)
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert any(not torch.equal(before[k], after[k]) for k in before), arm
        logits, maps = model(x, need_weights=True)
        assert logits.shape == (16, 10) and torch.isfinite(logits).all()
        assert len(maps) == ARCH_QUICK["depth"]
    assert isinstance(make_model("patch_ln", ARCH_QUICK).embed_norm, torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="arm must be one of"):
        make_model("post_ln", ARCH_QUICK)


def test_brightness_augment_range():
    from attnkit.vision.experiment import AUG_FACTOR, AUG_SHIFT, brightness_augment

    x = torch.ones(500, 1, 8, 8)
    out = brightness_augment(x, torch.Generator().manual_seed(0))
    v = out[:, 0, 0, 0]  # = factor + shift per image
    assert (out == v.view(-1, 1, 1, 1)).all()
    assert AUG_FACTOR[0] + AUG_SHIFT[0] <= v.min() and v.max() <= AUG_FACTOR[1] + AUG_SHIFT[1]
    assert v.std() > 0.3


def test_normalised_js_zero_for_identical_maps_and_about_one_for_other_images():
    from attnkit.vision.probe import normalised_js, other_image_pairing

    perm = other_image_pairing(200)
    assert (perm != torch.arange(200)).all() and sorted(perm.tolist()) == list(range(200))
    torch.manual_seed(0)
    model = ViT(8, 2, 1, 10, 16, 2, 2).eval()
    images = torch.rand(200, 1, 8, 8)
    with torch.no_grad():
        _, base = model(images, need_weights=True)
    assert np.allclose(normalised_js(base, [m.clone() for m in base]), 0.0)
    # Showing every image another (unrelated) image: as far as the normaliser's pairing.
    other = torch.roll(torch.arange(200), 7)
    njs = normalised_js(base, [m[other] for m in base])
    assert njs.shape == (2,) and np.all(np.abs(njs - 1.0) < 0.15), njs
    with pytest.raises(ValueError, match="same layers"):
        normalised_js(base, base[:1])
    with pytest.raises(ValueError, match="at least 2 images"):
        other_image_pairing(1)


def test_standardized_arm_is_exactly_invariant():
    torch.manual_seed(0)
    model = ViT(8, 2, 1, 10, 16, 2, 2, standardize=True).eval()
    images, _ = load_digits("test")
    x = torch.from_numpy(images[:64]).double()
    model = model.double()
    with torch.no_grad():
        logits, maps = model(x, need_weights=True)
        for a, b in ((0.1, 0.0), (3.0, 0.0), (1.0, 0.5), (0.3, -0.3)):
            l2, m2 = model(x * a + b, need_weights=True)
            torch.testing.assert_close(l2, logits, atol=1e-9, rtol=1e-9)
            for p, q in zip(maps, m2):
                torch.testing.assert_close(p, q, atol=1e-9, rtol=1e-9)
    probe = brightness_probe(model.float(), x.float(), (0.1, 0.3, 3.0), (-0.3, 0.5),
                             labels=torch.zeros(64, dtype=torch.long))
    for row in probe.rows:
        assert row["pred_agree"] == 1.0 and row["njs_mean"] < 1e-5
    # a pre-LN model without standardisation does move
    torch.manual_seed(0)
    plain = ViT(8, 2, 1, 10, 16, 2, 2).eval()
    assert brightness_probe(plain, x.float(), (0.1,), ()).rows[0]["njs_mean"] > 1e-3
    with pytest.raises(ValueError, match="constant"):
        model(torch.ones(2, 1, 8, 8, dtype=torch.float64))


def test_probe_accuracy_and_labels_checked():
    torch.manual_seed(1)
    model = ViT(8, 2, 1, 10, 16, 1, 2).eval()
    x = torch.rand(20, 1, 8, 8)
    y = model(x).argmax(-1)
    probe = brightness_probe(model, x, (1.0,), (), labels=y)
    assert probe.base_accuracy == 1.0 and probe.rows[0]["accuracy"] == 1.0
    assert probe.rows[0]["njs_mean"] == 0.0 and len(probe.js_between_images) == 1
    with pytest.raises(ValueError, match=r"labels must have shape \(20,\)"):
        brightness_probe(model, x, (1.0,), (), labels=y[:5])
