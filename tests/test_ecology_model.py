"""TrophicAttention, link-prediction metrics, splits without leakage, and the experiment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from attnkit.ecology import TrophicAttention, TrophicDistanceBias, niche_model, trophic_levels
from attnkit.ecology.linkpred import (
    FitConfig,
    average_precision,
    evaluate_scores,
    fit_trophic_attention,
    roc_auc,
    score_split,
    split_links,
    target_diets,
)


@pytest.fixture(autouse=True)
def one_thread():
    """(S, S) problems on a shared CPU: one thread is faster and steadier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_diet(model: TrophicAttention, levels: torch.Tensor | None) -> torch.Tensor:
    """Plain fp64 softmax of the documented logits, written out independently."""
    x = model.species.weight
    q = model.to_query(x)
    k = torch.cat([model.to_key(x), model.no_prey_key[None]])
    logits = q @ k.T / model.dim**0.5
    s = model.num_species
    if model.trophic_bias is not None:
        knots = model.trophic_bias.knots.numpy()
        values = model.trophic_bias.values.detach().numpy()
        d = (levels[:, None] - levels[None, :]).numpy()
        b = np.interp(d, knots, values)  # np.interp clamps beyond the ends, as documented
        logits[:, :s] = logits[:, :s] + torch.as_tensor(b)
    logits[torch.arange(s), torch.arange(s)] = float("-inf")
    return torch.softmax(logits, dim=1)


@pytest.mark.parametrize("bias", ["trophic", None])
def test_model_matches_reference(bias) -> None:
    torch.manual_seed(0)
    model = TrophicAttention(7, 4, bias=bias).double()
    if model.trophic_bias is not None:
        with torch.no_grad():
            model.trophic_bias.values.normal_()
    levels = torch.tensor([1.0, 1.0, 2.0, 2.5, 3.1, 7.0, -4.5], dtype=torch.float64)
    diet = model(levels)
    assert diet.shape == (7, 8)
    torch.testing.assert_close(diet, reference_diet(model, levels).detach())
    torch.testing.assert_close(diet.sum(dim=1), torch.ones(7, dtype=torch.float64))
    assert (diet.diagonal() == 0).all()


def test_bias_curve_gradcheck_and_knots() -> None:
    curve = TrophicDistanceBias(num_knots=9, max_distance=2.0).double()
    with torch.no_grad():
        curve.values.copy_(torch.randn(9, dtype=torch.float64))
    at_knots = curve(curve.knots)
    torch.testing.assert_close(at_knots, curve.values.detach())
    torch.testing.assert_close(curve(torch.tensor([-10.0, 10.0], dtype=torch.float64)),
                               curve.values.detach()[[0, -1]])
    d = torch.tensor([-1.7, -0.2, 0.3, 1.26], dtype=torch.float64)
    torch.autograd.gradcheck(lambda v: _curve_with(curve, v)(d), (curve.values.detach()
                                                                  .clone().requires_grad_(),))

    model = TrophicAttention(5, 3).double()
    levels = torch.tensor([1.0, 2.0, 2.2, 3.0, 4.1], dtype=torch.float64)

    def diet_of(values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, {"trophic_bias.values": values}, (levels,))

    torch.autograd.gradcheck(diet_of, (torch.randn(17, dtype=torch.float64,
                                                   requires_grad=True),))


def _curve_with(curve: TrophicDistanceBias, values: torch.Tensor):
    def f(d: torch.Tensor) -> torch.Tensor:
        k = values.numel()
        m = curve.max_distance
        pos = (d.clamp(-m, m) + m) * ((k - 1) / (2 * m))
        left = pos.floor().clamp(0, k - 2)
        frac = pos - left
        return values[left.long()] * (1 - frac) + values[left.long() + 1] * frac
    return f


def test_model_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bias"):
        TrophicAttention(5, 4, bias="niche")
    with pytest.raises(ValueError, match="trophic_levels"):
        TrophicAttention(5, 4)()
    with pytest.raises(ValueError, match=r"\(S,\)"):
        TrophicAttention(5, 4)(torch.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        TrophicAttention(3, 4)(torch.tensor([1.0, float("nan"), 2.0]))


def test_auc_metrics_hand_cases_and_sklearn() -> None:
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert roc_auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5  # ties count half
    assert average_precision(np.array([0.9, 0.8, 0.1]), np.array([1, 0, 1])) == pytest.approx(
        0.5 * 1.0 + 0.5 * (2 / 3))
    with pytest.raises(ValueError, match="positives and negatives"):
        roc_auc(np.array([0.1, 0.2]), np.array([1, 1]))
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, 50).astype(float)  # many ties
        labels = rng.random(50) < 0.3
        labels[:2] = [True, False]
        assert roc_auc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores))
        assert average_precision(scores, labels) == pytest.approx(
            metrics.average_precision_score(labels, scores))


def test_split_links_hides_twenty_percent() -> None:
    web = niche_model(20, 0.15, seed=1)
    flows = web.flows.copy()
    flows[3, 3] = 1.0  # a self-loop: kept for training, never held out
    offdiag_links = int(((flows > 0) & ~np.eye(20, dtype=bool)).sum())
    splits = split_links(flows, 0.2, 5, seed=0)
    assert len(splits) == 5
    for split in splits:
        assert len(split.heldout) == round(0.2 * offdiag_links)
        assert not (split.train_flows[split.heldout[:, 0], split.heldout[:, 1]] > 0).any()
        assert split.train_flows[3, 3] == 1.0
        # Evaluation pairs: exactly held-out links and non-links, never a training link.
        assert not (split.candidates & (split.train_flows > 0)).any()
        assert split.labels.sum() == len(split.heldout)
        assert (split.candidates & (flows == 0)).sum() + split.labels.sum() \
            == split.candidates.sum()
    assert len({tuple(map(tuple, s.heldout)) for s in splits}) > 1


def test_no_leakage_into_trophic_bias() -> None:
    """Changing only the held-out links of the full web changes nothing a predictor sees."""
    rng = np.random.default_rng(0)
    flows = niche_model(18, 0.2, seed=2).flows * rng.uniform(0.5, 2.0, (18, 18))
    split = split_links(flows, 0.2, 1, seed=7)[0]
    altered = flows.copy()
    altered[split.heldout[:, 0], split.heldout[:, 1]] *= 100.0  # same links, other flows
    split2 = split_links(altered, 0.2, 1, seed=7)[0]
    np.testing.assert_array_equal(split2.heldout, split.heldout)
    np.testing.assert_array_equal(split2.train_flows, split.train_flows)
    config = FitConfig(dim=4, steps=20, seed=0)
    a = score_split(split, config)
    b = score_split(split2, config)
    for key in ("bias", "nobias", "heuristic", "trophic_only", "levels"):
        np.testing.assert_array_equal(a[key], b[key])
    # The levels feeding the bias are the training web's, not the full web's.
    np.testing.assert_allclose(a["levels"], trophic_levels(split.train_flows))
    assert not np.allclose(a["levels"], trophic_levels(flows))


def test_bias_and_nobias_models_train_and_predict_heldout_links() -> None:
    web = niche_model(24, 0.15, seed=5)
    split = split_links(web.flows, 0.2, 1, seed=1)[0]
    levels = trophic_levels(split.train_flows)
    target = torch.as_tensor(target_diets(split.train_flows, weighted=False))
    tl = torch.as_tensor(levels)

    def loss(m: TrophicAttention) -> float:
        with torch.no_grad():
            return float(-(target * torch.log(m(tl).clamp_min(1e-30))).sum())

    for bias in ("trophic", None):
        untrained = fit_trophic_attention(split.train_flows, levels, bias,
                                          FitConfig(dim=8, steps=0))
        trained = fit_trophic_attention(split.train_flows, levels, bias,
                                        FitConfig(dim=8, steps=100))
        assert loss(trained) < 0.7 * loss(untrained)
    scores = score_split(split, FitConfig(dim=8, steps=100))
    for key in ("bias", "nobias"):
        auc, pr = evaluate_scores(split, scores[key])
        # Held-out links are never seen in training, yet are ranked well above chance.
        assert auc > 0.7, (key, auc)
        assert pr > split.labels.sum() / split.candidates.sum()


def test_experiment_on_a_small_scor_file(tmp_path: Path) -> None:
    from attnkit.ecology import write_scor
    from attnkit.ecology.experiment import EXPERIMENT
    from attnkit.results import RunContext

    web = niche_model(12, 0.2, seed=0)
    path = tmp_path / "small.scor"
    write_scor(web, path)
    ctx = RunContext(quick=True, out_dir=tmp_path / "out", options={"foodweb": str(path)})
    result = EXPERIMENT.run(ctx)
    for key in ("auc_bias", "auc_nobias", "auc_heuristic", "prauc_bias", "prauc_nobias",
                "prauc_heuristic", "auc_mf", "auc_pref_attach", "auc_prior_only",
                "auc_bias_training", "auc_nobias_cold_start", "auc_bias_at_0p9"):
        assert 0.0 <= result.metrics[key] <= 1.0
    assert result.params["prior"] == "isotope"  # the default for real webs
    names = [d.name for d in result.decisions]
    assert names == ["auc_gain_at_0p5", "auc_gain_cold_start"]
    for d in result.decisions:
        assert d.threshold == 0.0 and d.direction == ">"
        assert result.all_metrics()[f"{d.name}_ci_low"] == d.ci_low
    # One web: the interval over webs collapses to the estimate (no spread can be seen).
    gain = result.metrics["auc_bias_at_0p5"] - result.metrics["auc_nobias_at_0p5"]
    assert result.decisions[0].value == pytest.approx(gain)
    assert [row["species"] for row in result.table if "species" in row] == [12]
    for fig in result.figures:
        assert Path(fig).is_file()


def test_experiment_rejects_empty_living_web(tmp_path: Path) -> None:
    from attnkit.ecology.experiment import EXPERIMENT
    from attnkit.results import RunContext

    path = tmp_path / "water.scor"
    path.write_text("water budget\n2 0\npond\nstream\n-1\n1 5.0\n-1\n-1\n-1\n1 2 3.0\n-1\n")
    ctx = RunContext(quick=True, out_dir=tmp_path, options={"foodweb": str(path)})
    with pytest.raises(ValueError, match="empty living sub-web"):
        EXPERIMENT.run(ctx)


def test_experiment_rejects_unknown_diet(tmp_path: Path) -> None:
    from attnkit.ecology.experiment import EXPERIMENT
    from attnkit.results import RunContext

    ctx = RunContext(quick=True, out_dir=tmp_path, options={"diet": "biomass"})
    with pytest.raises(ValueError, match="--diet"):
        EXPERIMENT.run(ctx)


def test_within_predator_auc() -> None:
    from attnkit.ecology.linkpred import LinkSplit, within_predator_auc

    candidates = np.ones((3, 2), dtype=bool)
    labels = np.array([[True, False], [False, True], [False, False]])
    split = LinkSplit(train_flows=np.zeros((3, 3)), heldout=np.array([[0, 0], [1, 1]]),
                      candidates=candidates, labels=labels)
    scores = np.array([[0.9, 0.4], [0.5, 0.0], [0.1, 0.3]])
    # Predator 0: held-out prey ranked first (AUC 1); predator 1: ranked last (AUC 0).
    assert within_predator_auc(split, scores) == pytest.approx(0.5)
