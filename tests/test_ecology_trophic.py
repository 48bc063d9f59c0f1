"""Trophic levels, coherence and the niche model."""

from __future__ import annotations

import numpy as np
import pytest

from attnkit.ecology import niche_model, trophic_coherence, trophic_levels
from attnkit.ecology.trophic import basal_species


def chain(n: int) -> np.ndarray:
    f = np.zeros((n, n))
    for i in range(n - 1):
        f[i, i + 1] = 1.0
    return f


@pytest.mark.parametrize("method", ["basal", "mackay", "auto"])
def test_chain_levels(method: str) -> None:
    np.testing.assert_allclose(trophic_levels(chain(5), method=method), [1, 2, 3, 4, 5])
    coh = trophic_coherence(chain(5), method=method)
    assert coh.q == pytest.approx(0.0, abs=1e-12) and coh.F0 == pytest.approx(0.0, abs=1e-12)


def test_flow_weighted_vs_prey_averaged() -> None:
    # 0, 1 basal; 2 eats 0; 3 eats 1 (flow 3) and 2 (flow 1).
    f = np.zeros((4, 4))
    f[0, 2] = 1.0
    f[1, 3] = 3.0
    f[2, 3] = 1.0
    np.testing.assert_allclose(trophic_levels(f, weighted=False), [1, 1, 2, 2.5])
    np.testing.assert_allclose(trophic_levels(f, weighted=True), [1, 1, 2, 1 + 0.75 + 0.5])


def test_cycle_with_basal_species() -> None:
    # 0 basal; 1 eats 0 and 2; 2 eats 1 (a two-species loop): s1 = 1 + (1 + s2)/2, s2 = 1 + s1.
    f = np.zeros((3, 3))
    f[0, 1] = f[2, 1] = f[1, 2] = 1.0
    np.testing.assert_allclose(trophic_levels(f, weighted=False), [1, 4, 5])
    # A cannibal self-loop counts as a prey of its own level.
    g = chain(2)
    g[1, 1] = 1.0
    np.testing.assert_allclose(trophic_levels(g, weighted=False), [1, 3])


def test_no_basal_species_needs_mackay() -> None:
    cycle = np.zeros((3, 3))
    cycle[0, 1] = cycle[1, 2] = cycle[2, 0] = 1.0
    with pytest.raises(ValueError, match="no basal species"):
        trophic_levels(cycle, method="basal")
    levels = trophic_levels(cycle)  # auto falls back to MacKay: a pure loop is flat
    np.testing.assert_allclose(levels, [1, 1, 1])
    coh = trophic_coherence(cycle)
    assert coh.F0 == pytest.approx(1.0)  # maximally incoherent
    # A loop unreachable from the basal species of another component.
    f = np.zeros((5, 5))
    f[0, 1] = 1.0
    f[2, 3] = f[3, 4] = f[4, 2] = 1.0
    with pytest.raises(ValueError, match="not reachable"):
        trophic_levels(f, method="basal")
    h = trophic_levels(f)
    np.testing.assert_allclose(h[:2], [1, 2])


def test_mackay_matches_least_squares() -> None:
    rng = np.random.default_rng(0)
    f = (rng.random((8, 8)) < 0.3) * rng.random((8, 8))
    f[:, 0] = 0
    f[0, 1:] = 1.0  # connected, with a basal species
    h = trophic_levels(f, method="mackay")
    links = np.argwhere(f > 0)
    w = f[links[:, 0], links[:, 1]]
    # h minimises sum w (h_j - h_i - 1)^2: compare with a direct weighted least squares fit.
    a = np.zeros((len(links), 8))
    a[np.arange(len(links)), links[:, 1]] = 1
    a[np.arange(len(links)), links[:, 0]] -= 1
    sol = np.linalg.lstsq(a * np.sqrt(w)[:, None], np.sqrt(w), rcond=None)[0]
    np.testing.assert_allclose(h - h.min(), sol - sol.min(), atol=1e-9)


def test_bad_flows() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        trophic_levels(-chain(3))
    with pytest.raises(ValueError, match="square"):
        trophic_levels(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="method"):
        trophic_levels(chain(3), method="levine")


def test_real_web_levels(shared_data) -> None:
    from attnkit.ecology import read_pajek

    path = shared_data / "foodwebs" / "Chesapeake.paj"
    if not path.exists():
        pytest.skip("Chesapeake.paj not present")
    web = read_pajek(path).living()
    levels = trophic_levels(web)
    assert levels[basal_species(web)].tolist() == [1.0] * int(basal_species(web).sum())
    assert 1.0 <= levels.min() and levels.max() < 6.0
    assert levels[web.names.index("striped bass")] > levels[web.names.index("zooplankton")]


def test_niche_model_connectance_on_average() -> None:
    for connectance in (0.1, 0.2):
        cs = [niche_model(30, connectance, seed).connectance for seed in range(120)]
        assert abs(np.mean(cs) - connectance) < 0.15 * connectance


def test_niche_model_structure() -> None:
    web = niche_model(25, 0.15, seed=3)
    links = web.adjacency
    assert (links.any(axis=0) | links.any(axis=1)).all()  # no isolated species
    assert basal_species(web)[0]  # lowest niche value is basal
    for j in range(25):  # diets are contiguous in niche order
        prey = np.flatnonzero(links[:, j])
        if prey.size:
            assert prey.max() - prey.min() + 1 == prey.size
    again = niche_model(25, 0.15, seed=3)
    np.testing.assert_array_equal(again.flows, web.flows)


def test_niche_model_raises_after_retry_limit() -> None:
    with pytest.raises(RuntimeError, match="in 3 draws"):
        niche_model(40, 0.005, seed=0, max_tries=3)
    with pytest.raises(ValueError, match="connectance"):
        niche_model(10, 0.6)
    with pytest.raises(ValueError, match="num_species"):
        niche_model(1, 0.1)
