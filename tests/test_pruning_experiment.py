"""The ``pruning`` experiment's own pieces (the whole run is exercised by ``attnkit report``)."""

from __future__ import annotations

import pytest
import torch

from attnkit.experiment import stats
from attnkit.experiment.registry import registry
from attnkit.pruning_experiment import (
    _settings,
    _vit_data,
    accuracy,
    largest_within,
    train_to_plateau,
)
from attnkit.vision.model import ViT


def test_largest_within_takes_the_largest_fraction_inside_the_tolerance():
    acc = [(0.0, 95.0), (0.1, 94.5), (0.2, 93.0), (0.3, 94.1), (0.4, 80.0)]
    assert largest_within(acc, 1.0, higher_is_better=True) == 3  # not only the first run
    bpc = [(0.0, 2.0), (0.25, 2.06), (0.5, 2.3)]
    assert largest_within(bpc, 0.05, higher_is_better=False) == 0
    assert largest_within(bpc, 0.1, higher_is_better=False) == 1


def test_train_to_plateau_stops_and_keeps_the_best_epoch():
    data = _vit_data(0.2)
    assert len(data["x"]) + len(data["x_val"]) == 1438 and len(data["x_test"]) == 359
    data["x"], data["y"] = data["x"][:192], data["y"][:192]  # a small run: the stopping rule
    s = dict(_settings(True)["vit"], max_epochs=6, patience=1, lr_drops=0, lr=1e-2)
    torch.manual_seed(0)
    model = ViT(8, 2, 1, 10, dim=16, depth=1, num_heads=2)
    with stats.single_thread():
        model, info = train_to_plateau(model, data, s, seed=0)
    assert 1 <= info["best_epoch"] <= info["epochs"] <= 6 and len(info["states"]) == info["epochs"]
    assert info["epochs"] == 6 or info["epochs"] == info["best_epoch"] + 1  # patience 1
    assert accuracy(model, data["x_val"], data["y_val"]) == info["val_accuracy"]


def test_registered_under_its_old_name_with_the_vit_claim():
    exp = registry()["pruning"]
    assert exp.run.__module__ == "attnkit.pruning_experiment"
    assert "ViT" in exp.claim and "25%" in exp.claim


@pytest.mark.parametrize("quick", [True, False])
def test_full_mode_is_bigger(quick):
    s = _settings(quick)
    q = _settings(True)
    if not quick:
        assert s["vit"]["dim"] > q["vit"]["dim"] and s["vit"]["step_heads"] == 1
        assert s["lm"]["steps"] > q["lm"]["steps"]
    assert s["vit"]["depth"] == 4 and s["vit"]["num_heads"] == 8
