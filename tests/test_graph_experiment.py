"""The graph experiments' pieces: baselines, Const-GAT, CI logic over seeds, test-time
temperature, hub attention mass, data-set discovery."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from attnkit.experiment import RunContext
from attnkit.graphs import experiment as E
from attnkit.graphs.models import GAT, GCN, GraphSAGE, MeanAggregation
from attnkit.graphs.synthetic import cross_module_share, generate_ppi_like
from attnkit.nn.graph import build_graph_index


def _data():
    return generate_ppi_like(num_nodes=120, num_modules=4, num_labels=6, num_features=8,
                             avg_degree=5, seed=2)


def _by_hand(edge_index, n, self_loops):
    """Dense (N, N) aggregation matrices from the definitions (row = target)."""
    a = torch.zeros(n, n, dtype=torch.float64)
    a.index_put_((edge_index[1], edge_index[0]), torch.ones(edge_index.shape[1],
                                                            dtype=torch.float64),
                 accumulate=True)
    a.fill_diagonal_(0)
    if self_loops:
        a = a + torch.eye(n, dtype=torch.float64)
    return a


def test_const_gat_equals_mean_aggregation_with_the_same_weights():
    torch.manual_seed(0)
    data = _data()
    x = data.x.double()
    const = GAT(8, 3, 6, heads=2, layers=1, out_heads=1, dropout=0.0, score="constant").double()
    mean = MeanAggregation(8, 3, 6, heads=2, layers=1, dropout=0.0).double()
    with torch.no_grad():  # the same weights: one output head = one linear map
        mean.lins[0].weight.copy_(const.layers[0].lin_value.weight)
        mean.lins[0].bias.copy_(const.layers[0].lin_value.bias + const.layers[0].bias)
    torch.testing.assert_close(const(x, data.edge_index), mean(x, data.edge_index))


def test_sage_and_gcn_match_their_definitions():
    torch.manual_seed(0)
    data = _data()
    n, x = data.num_nodes, data.x.double()
    a = _by_hand(data.edge_index, n, self_loops=False)
    sage = GraphSAGE(8, 5, 6, layers=1).double()
    nbr_mean = a / a.sum(1, keepdim=True).clamp(min=1)
    expect = sage.self_lins[0](x) + nbr_mean @ (x @ sage.neigh_lins[0].weight.t())
    torch.testing.assert_close(sage(x, data.edge_index), expect)
    gcn = GCN(8, 5, 6, layers=1).double()
    ai = _by_hand(data.edge_index, n, self_loops=True)
    d = ai.sum(1).rsqrt()
    expect = (d[:, None] * ai * d[None, :]) @ (x @ gcn.lins[0].weight.t()) + gcn.lins[0].bias
    torch.testing.assert_close(gcn(x, data.edge_index), expect)


def _ppi_rows(gains, base=0.6):
    return [{"gat": base + g, "const_gat": base, "mean": base - 0.01, "sage": base,
             "gcn": base} for g in gains]


def test_ppi_decision_follows_the_paired_ci_over_seeds():
    _, gains, metrics, decisions = E.ppi_summary(_ppi_rows([0.05, 0.06, 0.04, 0.05, 0.07]))
    assert [d.outcome for d in decisions] == ["held", "held"]
    assert metrics["gain_gat_over_const"] == pytest.approx(0.054)
    assert metrics["gain_gat_over_const_ci_low"] > 0
    assert {"micro_f1_gat", "micro_f1_mean", "micro_f1_const_gat", "micro_f1_sage",
            "micro_f1_gcn", "gain_gat_over_sage_ci_high"} <= set(metrics)
    # the same mean gain with seed-to-seed spread crossing 0: inconclusive
    _, _, _, decisions = E.ppi_summary(_ppi_rows([0.2, -0.1, 0.15, -0.05, 0.07]))
    assert decisions[0].outcome == "inconclusive"
    # consistently worse than Const-GAT: not held, whatever the mean baseline says
    _, _, _, decisions = E.ppi_summary(_ppi_rows([-0.03, -0.02, -0.04]))
    assert decisions[0].outcome == "not held"
    # pairing matters: a large shared seed effect does not widen the paired interval
    rows = [{"gat": b + 0.02, "const_gat": b, "mean": b, "sage": b, "gcn": b}
            for b in (0.2, 0.5, 0.8)]
    assert E.ppi_summary(rows)[3][0].outcome == "held"


def test_hubs_decision_uses_relative_paired_drops():
    levels = [0.0, 4.0]
    rows = []
    for clean, noisy_plain, noisy_temp in ((0.6, 0.3, 0.4), (0.5, 0.2, 0.3), (0.7, 0.4, 0.5)):
        row = {f"{v}@0": clean for v in E.HUB_VARIANTS}
        row.update({f"{v}@4": noisy_plain for v in E.HUB_VARIANTS})
        row["temperature@4"] = noisy_temp
        rows.append(row)
    _, _, rel, reductions, decisions = E.hubs_summary(rows, levels)
    outcome = {d.name: d.outcome for d in decisions}
    assert outcome["drop_reduction_temperature"] == "held"
    assert outcome["drop_reduction_degree_norm"] == "not held"  # identical: CI is [0, 0]
    expect = sum((nt - npl) / c for c, npl, nt in ((0.6, 0.3, 0.4), (0.5, 0.2, 0.3),
                                                   (0.7, 0.4, 0.5))) / 3
    assert reductions["temperature"].value == pytest.approx(expect)
    assert rel["plain"]["4"][0] == pytest.approx(0.5)


def test_temperature_at_test_time_acts_and_is_restored():
    torch.manual_seed(0)
    data = _data()
    model = GAT(8, 4, 6, heads=2, dropout=0.0, score="dot").eval()
    w1 = model.attention_weights(data.x, data.edge_index)
    out1 = model(data.x, data.edge_index)
    with E.temperature_at_test(model, 1e6):  # T -> infinity: uniform weights
        w = model.attention_weights(data.x, data.edge_index)
    deg = data.degree() + 1  # with the self loop
    torch.testing.assert_close(w, (1.0 / deg[data.edge_index[1]]).float()[:, None].expand(-1, 2),
                               atol=1e-4, rtol=0)
    assert all(layer.temperature == 1.0 for layer in model.layers)
    torch.testing.assert_close(model(data.x, data.edge_index), out1)
    torch.testing.assert_close(model.attention_weights(data.x, data.edge_index), w1)


def test_hub_mass_of_uniform_and_attention_models():
    torch.manual_seed(0)
    data = _data()
    graph = build_graph_index(data.edge_index, data.num_nodes)
    is_hub = torch.zeros(data.num_nodes, dtype=torch.bool)
    is_hub[torch.topk(data.degree(), 3).indices] = True
    mean = MeanAggregation(8, 4, 6, heads=1, layers=1, dropout=0.0)
    got = E._hub_mass(mean, "mean", data, data.x, is_hub, graph)
    # by hand: hub neighbours / (neighbours + self) averaged over non-hubs next to a hub
    ei = data.edge_index
    shares = []
    for i in range(data.num_nodes):
        nbrs = ei[0][ei[1] == i]
        if not is_hub[i] and is_hub[nbrs].any():
            shares.append(float(is_hub[nbrs].sum()) / (nbrs.numel() + 1))
    assert got == pytest.approx(sum(shares) / len(shares))
    gat = GAT(8, 4, 6, heads=2, dropout=0.0, score="constant")
    assert E._hub_mass(gat, "gat", data, data.x, is_hub, graph) == pytest.approx(got, rel=1e-5)


def test_cross_module_share():
    data, module = generate_ppi_like(num_nodes=300, within_module=1.0, hub_within_module=1.0,
                                     seed=0, return_modules=True)
    assert cross_module_share(data.edge_index, module) == 0.0
    data, module = generate_ppi_like(num_nodes=300, within_module=0.0, hub_within_module=0.0,
                                     num_modules=10, seed=0, return_modules=True)
    assert cross_module_share(data.edge_index, module) > 0.8
    assert math.isnan(cross_module_share(torch.zeros(2, 0, dtype=torch.long), module))


def test_planetoid_runs_every_data_set_present(tmp_path):
    ctx = RunContext(quick=True, out_dir=tmp_path, options={})
    for name in ("cora", "pubmed"):
        (tmp_path / f"ind.{name}.graph").write_bytes(b"")
    assert E._datasets(ctx, tmp_path) == ["cora", "pubmed"]
    ctx.options["dataset"] = "CiteSeer"
    assert E._datasets(ctx, tmp_path) == ["citeseer"]
    with pytest.raises(FileNotFoundError, match="ind.cora"):
        E._datasets(RunContext(quick=True, out_dir=tmp_path), Path(tmp_path / "x"))
    assert E._planetoid_setup("pubmed", False)["out_heads"] == 8
    assert E._planetoid_setup("cora", True)["epochs"] == 200
