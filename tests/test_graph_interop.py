"""PyTorch Geometric / SciPy interop: graph inputs, sparse weight exports, Const-GAT."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from attnkit import attention
from attnkit import patterns as P
from attnkit.graphs import GraphData
from attnkit.nn import GraphAttention

pyg = pytest.importorskip("torch_geometric")
sp = pytest.importorskip("scipy.sparse")
from torch_geometric.data import Data  # noqa: E402
from torch_geometric.utils import to_scipy_sparse_matrix, to_torch_coo_tensor  # noqa: E402


def _edges(n=9, e=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (2, e), generator=g)


def _same_pattern(a, b, n):
    return torch.equal(a.to_dense(n, n), b.to_dense(n, n))


def _qkv(n, h=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))


# ------------------------------------------------------------------------- graph inputs


def test_graph_of_data_equals_graph_of_edge_index():
    ei = _edges()
    ref = P.graph(ei, 12)  # nodes 9..11 isolated: only Data's num_nodes knows them
    assert _same_pattern(P.graph(Data(edge_index=ei, num_nodes=12)), ref, 12)
    q, k, v = _qkv(12)
    torch.testing.assert_close(attention(q, k, v, pattern=P.graph(Data(edge_index=ei,
                                                                       num_nodes=12))),
                               attention(q, k, v, pattern=ref))


def test_num_nodes_inferred_from_edge_index():
    ei = _edges()
    n = int(ei.max()) + 1
    pat = P.graph(ei)
    assert pat.num_src == pat.num_dst == n
    assert _same_pattern(pat, P.graph(ei, n), n)
    assert P.graph(torch.zeros(2, 0, dtype=torch.long)).num_dst == 0


@pytest.mark.parametrize("kind", ["coo", "csr", "scipy_coo", "scipy_csr"])
def test_graph_of_sparse_adjacency(kind):
    ei = _edges()
    n = 10
    adj = {"coo": lambda: to_torch_coo_tensor(ei, size=n),
           "csr": lambda: to_torch_coo_tensor(ei, size=n).to_sparse_csr(),
           "scipy_coo": lambda: to_scipy_sparse_matrix(ei, num_nodes=n),
           "scipy_csr": lambda: to_scipy_sparse_matrix(ei, num_nodes=n).tocsr()}[kind]()
    assert _same_pattern(P.graph(adj), P.graph(ei, n), n)
    assert _same_pattern(P.graph(adj, n), P.graph(ei, n), n)


def test_adjacency_direction_and_stored_zeros():
    # A[j, i] != 0 is the edge j -> i: query i sees key j
    a = sp.coo_matrix(([1.0, 0.0], ([0, 1], [2, 2])), shape=(3, 3))
    dense = P.graph(a).to_dense(3, 3)
    expect = torch.zeros(3, 3, dtype=torch.bool)
    expect[2, 0] = True  # the stored zero at (1, 2) is not an edge
    assert torch.equal(dense, expect)
    rect = P.graph(torch.tensor([[0.0, 1.0], [0.0, 0.0], [2.0, 0.0]]).to_sparse())
    assert (rect.num_src, rect.num_dst) == (3, 2)


def test_graph_attention_accepts_data():
    torch.manual_seed(0)
    n = 9
    ei = _edges(n)
    x = torch.randn(n, 5, dtype=torch.float64)
    ea = torch.randn(ei.shape[1], 3, dtype=torch.float64)
    layer = GraphAttention(5, 4, heads=2, score="additive", edge_dim=3).double()
    ref, w_ref = layer(x, ei, ea, return_weights=True)
    data = Data(x=x, edge_index=ei, edge_attr=ea)
    out, w = layer(data, return_weights=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(layer(x, data, ea), ref)
    plain = GraphAttention(5, 4, heads=2).double()
    distinct = torch.unique(ei, dim=1)  # an adjacency holds each pair once
    torch.testing.assert_close(plain(x, to_torch_coo_tensor(distinct, size=n)),
                               plain(x, distinct))
    with pytest.raises(ValueError, match="edge_index must not be given"):
        layer(data, ei)


def test_graph_data_from_pyg_round_trip():
    n = 9
    data = Data(x=torch.randn(n, 4), edge_index=_edges(n), y=torch.randint(0, 3, (n,)),
                train_mask=torch.rand(n) < 0.5)
    gd = GraphData.from_pyg(data)
    assert gd.num_nodes == n and torch.equal(gd.edge_index, data.edge_index)
    assert torch.equal(gd.y, data.y) and torch.equal(gd.train_mask, data.train_mask)
    back = gd.to_pyg()
    assert torch.equal(back.x, data.x) and torch.equal(back.edge_index, data.edge_index)
    bare = GraphData.from_pyg(Data(edge_index=_edges(n), num_nodes=12))
    assert bare.num_nodes == 12 and bare.x is None
    with pytest.raises(ValueError, match="edge_index"):
        GraphData.from_pyg(Data(x=torch.randn(3, 2), edge_index=torch.tensor([[0], [5]])))
    with pytest.raises(ValueError, match="train_mask"):
        GraphData.from_pyg(Data(x=torch.randn(3, 2), edge_index=torch.tensor([[0], [1]]),
                                train_mask=torch.ones(4, dtype=torch.bool)))


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("ei, n, err, match", [
    (torch.tensor([[0, 1], [1, 5]]), 3, ValueError, "num_nodes"),        # out of range
    (torch.tensor([[0, -1], [1, 0]]), 3, ValueError, "negative"),
    (torch.tensor([[0, -1], [1, 0]]), None, ValueError, "negative"),
    (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), 3, TypeError, "edge_index"),  # non-integer
    ([[0, 1.5], [1, 0]], None, TypeError, "edge_index"),
    (torch.tensor([0, 1, 2]), 3, ValueError, r"edge_index must have shape \(2, E\)"),
    (torch.zeros(3, 2, dtype=torch.long), 3, ValueError, r"shape \(2, E\)"),
    (torch.tensor([[0, 1], [1, 4]]), 4, ValueError, "num_nodes=4"),      # n not above max
])
def test_bad_edge_index(ei, n, err, match):
    with pytest.raises(err, match=match):
        P.graph(ei, n)


def test_bad_graph_objects():
    ei = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="num_nodes"):
        P.graph(Data(edge_index=ei, num_nodes=3), 5)  # disagrees with the Data
    with pytest.raises(ValueError, match="num_nodes"):
        P.graph(Data(edge_index=ei, num_nodes=2))  # Data's count below its largest index
    with pytest.raises(ValueError, match="num_nodes"):
        P.graph(to_scipy_sparse_matrix(ei, num_nodes=3), 4)
    with pytest.raises(ValueError, match="2-D"):
        P.graph(torch.zeros(2, 2, 2).to_sparse())
    layer = GraphAttention(2, 2)
    with pytest.raises(ValueError, match="edge_index refers to node 2"):
        layer(torch.randn(2, 2), ei)  # checked before any kernel runs


def test_no_torch_geometric_import():
    code = ("import sys, torch, scipy.sparse as sp\n"
            "from attnkit import patterns as P, attention\n"
            "import attnkit.graphs, attnkit.nn.graph\n"
            "P.graph(torch.tensor([[0, 1], [1, 0]]))\n"
            "P.graph(sp.eye(3, format='csr'))\n"
            "q = torch.randn(1, 1, 3, 2)\n"
            "out, w = attention(q, q, q, pattern=P.graph(torch.tensor([[0, 1], [1, 2]])),"
            " return_weights=True)\n"
            "w.to_torch_sparse(); w.to_scipy()\n"
            "assert 'torch_geometric' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------- sparse exports


def test_sparse_exports_round_trip():
    n = 11
    ei = _edges(n, 40, seed=3)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 4, generator=g, dtype=torch.float64) for _ in range(3))
    _, w = attention(q, k, v, pattern=P.graph(ei, n), return_weights=True)
    dense = w.to_dense()
    t = w.to_torch_sparse()
    assert t.layout == torch.sparse_csr and t.shape == (2, 3, n, n)
    torch.testing.assert_close(t.to_dense(), dense)
    for b in range(2):
        for h in range(3):
            s = w.to_scipy(b, h)
            assert s.shape == (n, n) and s.nnz == w.nnz
            torch.testing.assert_close(torch.from_numpy(s.toarray()), dense[b, h])
    with pytest.raises(ValueError, match="index"):
        w.to_scipy()  # 2 x 3 maps: which one?
    with pytest.raises(ValueError, match="index"):
        w.to_scipy(2, 0)
    _, w1 = attention(q[:1, :1], k[:1, :1], v[:1, :1], pattern=P.sliding_window(2),
                      return_weights=True)
    torch.testing.assert_close(torch.from_numpy(w1.to_scipy().toarray()), w1.to_dense()[0, 0])


# ----------------------------------------------------------------------------- Const-GAT


@pytest.mark.parametrize("degree_norm", [None, "log"])
def test_constant_score_is_mean_aggregation(degree_norm):
    torch.manual_seed(0)
    n = 8
    ei = torch.cat([_edges(n, 25, seed=5), torch.tensor([[1, 1], [2, 2]])], 1)  # a duplicate
    x = torch.randn(n, 5, dtype=torch.float64)
    layer = GraphAttention(5, 3, heads=2, score="constant", degree_norm=degree_norm).double()
    out, w = layer(x, ei, return_weights=True)
    # by hand: the layer's own value projection averaged over each node's in-edges (with
    # multiplicity) plus one self loop; with "log", each neighbour weighted by 1/out_degree
    keep = ei[0] != ei[1]
    src = torch.cat([ei[0][keep], torch.arange(n)])
    dst = torch.cat([ei[1][keep], torch.arange(n)])
    wt = torch.ones(src.numel(), dtype=torch.float64)
    if degree_norm == "log":
        outdeg = torch.zeros(n, dtype=torch.float64).index_add(0, src, wt)
        wt = 1.0 / outdeg[src]
    val = layer.lin_value(x)  # (N, H*C)
    num = torch.zeros(n, 6, dtype=torch.float64).index_add(0, dst, val[src] * wt[:, None])
    den = torch.zeros(n, dtype=torch.float64).index_add(0, dst, wt)
    torch.testing.assert_close(out, num / den[:, None] + layer.bias)
    if degree_norm is None:  # uniform: each in-edge of node i weighs 1 / (in-degree + 1)
        deg = torch.zeros(n, dtype=torch.float64).index_add(0, dst, torch.ones_like(den[dst]))
        torch.testing.assert_close(w[keep], (1.0 / deg[ei[1][keep]])[:, None].expand(-1, 2))
    with pytest.raises(ValueError, match="edge_dim"):
        GraphAttention(5, 3, score="constant", edge_dim=2)
