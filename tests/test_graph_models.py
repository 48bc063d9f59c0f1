"""Models, training loop and experiment registration of the graph application."""

from __future__ import annotations

import pytest
import torch

from attnkit.graphs.models import GAT, MeanAggregation, accuracy, evaluate, fit, micro_f1
from attnkit.graphs.synthetic import generate_ppi_like
from attnkit.nn.graph import build_graph_index


def _data():
    return generate_ppi_like(num_nodes=200, num_modules=5, num_labels=8, num_features=12,
                             avg_degree=6, feature_signal=1.5, seed=1)


def test_shapes_and_mean_baseline_is_a_mean():
    data = _data()
    gat = GAT(12, 4, 8, heads=2, layers=2, out_heads=3, dropout=0.0)
    mean = MeanAggregation(12, 4, 8, heads=2, layers=1, dropout=0.0)
    assert gat(data.x, data.edge_index).shape == (200, 8)
    out = mean(data.x, data.edge_index)
    # one layer: the average of W x_j + b over the neighbours and the node itself
    lin = mean.lins[0]
    for node in (0, 17, 100):
        nbrs = torch.cat([data.edge_index[0][data.edge_index[1] == node], torch.tensor([node])])
        torch.testing.assert_close(out[node], lin(data.x[nbrs]).mean(0))


def test_metrics():
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    logits = torch.tensor([[2.0, 1.0], [-1.0, 3.0]])
    # tp = 2, fp = 1, fn = 1
    assert micro_f1(logits, y) == pytest.approx(4 / 6)
    assert accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])) == 0.5


def test_fit_learns_and_restores_best():
    torch.manual_seed(0)
    data = _data()
    graph = build_graph_index(data.edge_index, data.num_nodes)
    model = GAT(12, 8, 8, heads=2, dropout=0.0, score="dot", multilabel=True)
    before = evaluate(model, data, data.val_mask, graph)
    res = fit(model, data, epochs=40, lr=0.02, weight_decay=0.0, patience=40, graph=graph,
              monitor="loss")
    after = evaluate(model, data, data.val_mask, graph)
    assert after > before and after > 0.5
    assert res.epochs == 40 and len(res.val_history) == 40
    with pytest.raises(ValueError, match="monitor"):
        fit(model, data, epochs=1, monitor="acc")


def test_attention_weights_of_first_layer():
    data = _data()
    gat = GAT(12, 4, 8, heads=2, dropout=0.0)
    w = gat.attention_weights(data.x, data.edge_index)
    assert w.shape == (data.edge_index.shape[1], 2)
    # incoming weights of a node plus its self loop sum to one: all others sum to < 1
    per_node = torch.zeros(200, 2).index_add(0, data.edge_index[1], w)
    has_edges = data.degree() > 0
    assert (per_node < 1).all() and (per_node[has_edges] > 0).all()


def test_experiments_registered():
    from attnkit.experiments import registry
    from attnkit.graphs.experiment import EXPERIMENTS

    names = [e.name for e in EXPERIMENTS]
    assert names == ["ppi", "hubs", "planetoid"]
    reg = registry()
    assert all(n in reg for n in names)
    opts = {o.flag: o for o in EXPERIMENTS[2].options}
    assert opts["--data-dir"].required and opts["--dataset"].default is None


@pytest.mark.parametrize("score", ["additive", "dot", "additive_v2"])
def test_sparse_bag_of_words_input_equals_dense(score):
    from attnkit.graphs.models import GAT, sparse_features

    torch.manual_seed(0)
    n, f = 30, 50
    x = (torch.rand(n, f) < 0.05).to(torch.float64)
    ei = torch.randint(0, n, (2, 90))
    assert sparse_features(x).layout == torch.sparse_csr
    assert sparse_features(torch.ones(n, f)).layout == torch.strided  # dense stays dense
    model = GAT(f, 4, 3, heads=2, layers=2, score=score).double().eval()
    # the layers called directly on the dense matrix: the reference
    dense_out = model.layers[1](torch.nn.functional.elu(model.layers[0](x, ei)), ei)
    dense_out.sum().backward()
    dense_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sparse_out = model(x, ei)  # GAT turns the mostly-zero x into CSR itself
    sparse_out.sum().backward()
    torch.testing.assert_close(sparse_out, dense_out, atol=1e-12, rtol=0)
    for a, b in zip(dense_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    # training mode: dropout acts on the stored values only; zeros stay zeros
    from attnkit.graphs.models import _dropout

    dropped = _dropout(sparse_features(x), 0.5, True).to_dense()
    assert ((dropped != 0) <= (x != 0)).all()
    model.train()
    assert torch.isfinite(model(x, ei)).all()
