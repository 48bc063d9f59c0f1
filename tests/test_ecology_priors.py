"""Issue 23: external trophic priors, cold-start splits, batched training, gain CIs and the
experiment's handling of bad webs."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from attnkit.argtypes import nonnegative_float
from attnkit.ecology import FoodWeb, TrophicAttention, niche_model, trophic_levels
from attnkit.ecology.experiment import (
    PreparedWeb,
    _chosen_trait,
    prepare_web,
    web_gain_ci,
)
from attnkit.ecology.linkpred import (
    FitConfig,
    LinkSplit,
    attention_scores,
    cold_start_split,
    evaluate_scores,
    fit_batched,
    fit_trophic_attention,
    low_rank_scores,
    preferential_attachment_scores,
    split_links,
)
from attnkit.ecology.model import BatchedTrophicAttention
from attnkit.ecology.priors import full_web_levels, isotope_prior, standardise
from attnkit.experiment import stats


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _web(flows: np.ndarray, types: tuple[str, ...] | None = None) -> FoodWeb:
    n = flows.shape[0]
    return FoodWeb(names=tuple(f"sp{i}" for i in range(n)), types=types or ("living",) * n,
                   flows=flows, biomass=np.full(n, np.nan), title="t")


# --------------------------------------------------------------------------- priors


def test_isotope_noise_reproducible_by_seed() -> None:
    levels = np.linspace(1.0, 4.0, 200)
    a = isotope_prior(levels, 0.5, np.random.default_rng(3))
    b = isotope_prior(levels, 0.5, np.random.default_rng(3))
    c = isotope_prior(levels, 0.5, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert np.std(a - levels) == pytest.approx(0.5, rel=0.15)
    np.testing.assert_array_equal(isotope_prior(levels, 0.0, np.random.default_rng(3)), levels)
    # Same generator state, other SD: the same standard-normal draw, scaled (common numbers).
    d = isotope_prior(levels, 1.0, np.random.default_rng(3))
    np.testing.assert_allclose(d - levels, 2.0 * (a - levels))
    with pytest.raises(ValueError, match="noise_sd"):
        isotope_prior(levels, -0.1, np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        isotope_prior(levels, 0.1, 3)


def test_full_web_levels_use_detritus() -> None:
    # 0 plant -> 1 grazer; 2 detritus -> 3 detritivore; 4 Input -> 0 (boundary, dropped).
    flows = np.zeros((5, 5))
    flows[0, 1] = 2.0
    flows[2, 3] = 1.0
    flows[4, 0] = 5.0
    web = _web(flows, ("living", "living", "detritus", "living", "import"))
    levels = full_web_levels(web)
    np.testing.assert_allclose(levels, [1.0, 2.0, 2.0])  # the detritivore is not basal
    # The living sub-web alone would call the detritivore basal (level 1).
    np.testing.assert_allclose(trophic_levels(web.subweb([0, 1, 3]).flows), [1.0, 2.0, 1.0])


def test_standardise() -> None:
    z = standardise(np.array([1.0, 2.0, 3.0, 6.0]))
    assert z.mean() == pytest.approx(0.0) and z.std() == pytest.approx(1.0)
    np.testing.assert_array_equal(standardise(np.ones(3)), np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        standardise(np.array([1.0, np.nan]))


def test_training_prior_never_reads_heldout_links() -> None:
    """Two full webs that differ only in the held-out links give the same training prior and
    the same trained scores: --prior training sees the training links only."""
    full = niche_model(20, 0.2, seed=4).flows
    split = split_links(full, 0.5, 1, seed=2)[0]
    other = full.copy()
    other[split.heldout[:, 0], split.heldout[:, 1]] = 0.0  # the held-out links removed ...
    free = np.argwhere((full == 0) & ~np.eye(20, dtype=bool))[:7]
    other[free[:, 0], free[:, 1]] = 1.0  # ... and other links hidden in their place
    labels = np.zeros((20, 20), dtype=bool)
    labels[free[:, 0], free[:, 1]] = True
    split2 = LinkSplit(train_flows=split.train_flows.copy(), heldout=free,
                       candidates=split.candidates, labels=labels)
    web = PreparedWeb("t", tuple(map(str, range(20))), full, {}, np.zeros(20), 0, 0)
    web2 = PreparedWeb("t", tuple(map(str, range(20))), other, {}, np.zeros(20), 0, 0)
    rng = np.random.default_rng(0)
    t1 = _chosen_trait(web, "training", 0.5, split, False, rng)
    t2 = _chosen_trait(web2, "training", 0.5, split2, False, rng)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_allclose(t1, trophic_levels(split.train_flows, weighted=False))
    assert not np.allclose(t1, trophic_levels(full, weighted=False))
    config = FitConfig(dim=4, steps=15, seed=0)
    s1 = fit_batched([split.train_flows], standardise(t1)[None], np.array([True]), config)
    s2 = fit_batched([split2.train_flows], standardise(t2)[None], np.array([True]), config)
    np.testing.assert_array_equal(s1, s2)


# --------------------------------------------------------------------------- splits


def test_cold_start_hides_every_link_of_the_chosen_predators() -> None:
    flows = niche_model(25, 0.15, seed=6).flows.copy()
    np.fill_diagonal(flows, 0.0)
    flows[7, 7] = 1.0  # cannibalism: kept in the web
    offdiag = (flows > 0) & ~np.eye(25, dtype=bool)
    predators = np.flatnonzero(offdiag.any(axis=0))
    splits = cold_start_split(flows, 0.2, 6, seed=1)
    chosen = set()
    for split in splits:
        cold = split.unknown_diet
        assert cold.sum() == round(0.2 * predators.size)
        assert set(np.flatnonzero(cold)) <= set(predators)
        chosen |= set(np.flatnonzero(cold))
        assert not (split.train_flows[:, cold] > 0).any()  # every diet link, self-loop too
        np.testing.assert_array_equal(split.train_flows[:, ~cold], flows[:, ~cold])
        np.testing.assert_array_equal(split.labels, offdiag & cold[None, :])
        assert len(split.heldout) == int(offdiag[:, cold].sum())
        # Evaluated within the cold predators' columns, never on the diagonal.
        assert not split.candidates[:, ~cold].any()
        assert not np.diag(split.candidates).any()
    assert len(chosen) > round(0.2 * predators.size)  # different predators per split
    with pytest.raises(ValueError, match="too few"):
        cold_start_split(np.array([[0.0, 1.0], [0.0, 0.0]]), 0.2, 1)


def test_structural_baselines() -> None:
    a = np.zeros((4, 4))
    a[0, 1] = a[0, 2] = a[1, 2] = a[2, 3] = 1.0
    pa = preferential_attachment_scores(a)
    assert pa[0, 2] == (2 + 1) * (2 + 1)  # prey 0 eaten twice, predator 2 eats twice
    assert pa[3, 0] == 1.0
    np.testing.assert_allclose(low_rank_scores(a, rank=4), a, atol=1e-12)  # full rank: exact
    assert np.linalg.matrix_rank(low_rank_scores(a, rank=1)) == 1
    with pytest.raises(ValueError, match="rank"):
        low_rank_scores(a, rank=0)


def test_evaluate_one_class_is_nan() -> None:
    split = LinkSplit(train_flows=np.zeros((2, 2)), heldout=np.zeros((0, 2), dtype=int),
                      candidates=np.ones((2, 2), dtype=bool), labels=np.zeros((2, 2), bool))
    assert all(math.isnan(x) for x in evaluate_scores(split, np.zeros((2, 2))))


# --------------------------------------------------------------------------- training


def test_batched_forward_matches_single_models() -> None:
    torch.manual_seed(0)
    models = [TrophicAttention(6, 4, bias="trophic").double(),
              TrophicAttention(6, 4, bias=None).double()]
    with torch.no_grad():
        models[0].trophic_bias.values.normal_()
    batched = BatchedTrophicAttention.from_models(models)
    tl = torch.rand(2, 6, dtype=torch.float64) * 3
    out = batched(tl)
    torch.testing.assert_close(out[0], models[0](tl[0]))
    torch.testing.assert_close(out[1], models[1](None))
    with pytest.raises(ValueError, match="trophic_levels"):
        batched(tl[:1])


def test_batched_training_equals_separate_training() -> None:
    web = niche_model(16, 0.2, seed=3)
    splits = split_links(web.flows, 0.3, 2, seed=0)
    levels = [trophic_levels(s.train_flows) for s in splits]
    config = FitConfig(dim=4, steps=25, seed=0)
    got = fit_batched([splits[0].train_flows, splits[1].train_flows, splits[0].train_flows],
                      np.stack([levels[0], levels[1], levels[0]]),
                      np.array([True, True, False]), config, weighted=False, seeds=[0, 1, 0])
    for i, (flows, lv, bias, seed) in enumerate([
            (splits[0].train_flows, levels[0], "trophic", 0),
            (splits[1].train_flows, levels[1], "trophic", 1),
            (splits[0].train_flows, None, None, 0)]):
        single = fit_trophic_attention(flows, lv, bias, FitConfig(dim=4, steps=25, seed=seed),
                                       weighted=False)
        np.testing.assert_allclose(got[i], attention_scores(single, lv), atol=1e-10)


def test_unknown_diet_rows_leave_the_loss() -> None:
    flows = niche_model(12, 0.25, seed=1).flows
    unknown = np.zeros((1, 12), dtype=bool)
    unknown[0, 5] = True
    cfg = FitConfig(dim=4, steps=10, seed=0)
    a = fit_batched([flows], np.zeros((1, 12)), np.array([False]), cfg, unknown_diet=unknown)
    b = fit_batched([flows], np.zeros((1, 12)), np.array([False]), cfg)
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="unknown_diet"):
        fit_batched([flows], np.zeros((1, 12)), np.array([False]), cfg,
                    unknown_diet=unknown[:, :5])


# --------------------------------------------------------------------------- CI logic


def test_web_gain_ci_is_paired_over_webs() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.9, (6, 1)) + rng.normal(0, 0.01, (6, 5))  # big web effects
    a = base + 0.02 + rng.normal(0, 0.002, (6, 5))
    ci = web_gain_ci(a, base)
    assert ci.n == 6
    ref = stats.mean_ci((a - base).mean(axis=1))
    assert (ci.value, ci.low, ci.high) == pytest.approx((ref.value, ref.low, ref.high))
    assert 0.0 < ci.low < 0.02 < ci.high  # pairing removes the web effect
    unpaired = stats.mean_ci(a.mean(axis=1))
    assert unpaired.high - unpaired.low > 10 * (ci.high - ci.low)
    assert ci.decide("auc_gain_at_0p5", 0.0).outcome == "held"
    assert web_gain_ci(base - 0.02, base).decide("g", 0.0).outcome == "not held"
    # A NaN split is ignored within its web; a web with no finite split makes it NaN.
    a2 = a.copy()
    a2[0, 0] = np.nan
    assert math.isfinite(web_gain_ci(a2, base).value)
    a2[0, :] = np.nan
    assert web_gain_ci(a2, base).decide("g", 0.0).outcome == "inconclusive"
    with pytest.raises(ValueError, match="paired"):
        web_gain_ci(a, base[:, :3])


# --------------------------------------------------------------------------- bad webs


def test_prepare_web_handles_isolated_species_and_self_loops() -> None:
    flows = np.zeros((9, 9))
    for prey, pred in [(0, 2), (1, 2), (0, 3), (2, 3), (1, 4), (2, 4), (3, 4), (0, 5), (3, 5),
                       (4, 5), (2, 6), (5, 6)]:
        flows[prey, pred] = 1.0
    flows[4, 4] = 1.0  # cannibalism
    prepared = prepare_web(_web(flows))  # species 7, 8 are isolated
    assert prepared.dropped_isolated == 2
    assert len(prepared.names) == 7
    assert prepared.self_loops == 1
    assert prepared.flows[4, 4] == 1.0
    with pytest.raises(ValueError, match="no link"):
        prepare_web(_web(np.eye(4)))  # self-loops only
    small = np.zeros((4, 4))
    small[0, 1] = small[1, 2] = 1.0
    with pytest.raises(ValueError, match="too few"):
        prepare_web(_web(small))
    with pytest.raises(ValueError, match="empty living"):
        prepare_web(_web(flows, ("detritus",) * 9))


def test_prior_noise_option_type() -> None:
    assert nonnegative_float("0.25") == 0.25
    for bad in ("-1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            nonnegative_float(bad)


def test_experiment_bad_prior_combinations(tmp_path: Path) -> None:
    from attnkit.ecology import write_scor
    from attnkit.ecology.experiment import EXPERIMENT
    from attnkit.experiment import RunContext

    path = tmp_path / "w.scor"
    write_scor(niche_model(12, 0.2, seed=0), path)
    ctx = RunContext(quick=True, out_dir=tmp_path, options={"foodweb": str(path),
                                                            "prior": "niche"})
    with pytest.raises(ValueError, match="--prior niche"):
        EXPERIMENT.run(ctx)
    ctx = RunContext(quick=True, out_dir=tmp_path, options={"prior": "body size"})
    with pytest.raises(ValueError, match="--prior"):
        EXPERIMENT.run(ctx)


@pytest.mark.parametrize("argv, fragment", [
    (["--prior-noise", "-1"], "number >= 0"),
    (["--prior-noise", "lots"], "number >= 0"),
    (["--prior", "bodysize"], "one of niche, isotope, training"),
])
def test_prior_options_refused_at_parsing(argv, fragment, capsys) -> None:
    from attnkit import cli
    from attnkit.experiments import registry

    parser = cli.experiment_parser(registry()["foodweb"])
    assert "--prior-noise SD" in parser.format_help()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    assert e.value.code == 2
    assert fragment in capsys.readouterr().err
