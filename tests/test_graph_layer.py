"""GraphAttention against a dense masked reference, PyG, and on hand-made graphs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnkit.nn import GraphAttention
from attnkit.nn.graph import build_graph_index

SCORES = ("dot", "additive", "additive_v2")


def _graph(n=7, e=22, seed=0, dup=True, loops=True):
    gen = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n, (2, e), generator=gen)
    if not loops:
        ei = ei[:, ei[0] != ei[1]]
    key = ei[1] * n + ei[0]
    first = torch.tensor([int((key[:i] == key[i]).sum()) == 0 for i in range(key.numel())])
    ei = ei[:, first]  # distinct random edges, in their drawn order
    if dup:  # repeat a few edges so duplicates are exercised
        ei = torch.cat([ei, ei[:, :3]], 1)
    return ei


def dense_reference(layer: GraphAttention, x, ei, edge_attr=None):
    """Dense (H, N, N) logits from the formulas, masked softmax that counts duplicate edges
    separately. Returns (out, per-input-edge weights (E, H))."""
    n = x.shape[0]
    h, c = layer.heads, layer.out_dim
    src, dst = ei[0], ei[1]
    ea = None if edge_attr is None else edge_attr.to(x.dtype)
    if layer.add_self_loops:
        keep = src != dst
        loop_attr = None
        if ea is not None:
            s = torch.zeros(n, ea.shape[1], dtype=x.dtype).index_add(0, dst[keep], ea[keep])
            ones = torch.ones(int(keep.sum()), dtype=x.dtype)
            cnt = torch.zeros(n, dtype=x.dtype).index_add(0, dst[keep], ones)
            loop_attr = s / cnt.clamp(min=1).unsqueeze(-1)
        ar = torch.arange(n)
        src, dst = torch.cat([src[keep], ar]), torch.cat([dst[keep], ar])
        if ea is not None:
            ea = torch.cat([ea[keep], loop_attr])
    mult = torch.zeros(n, n, dtype=x.dtype)
    mult.index_put_((dst, src), torch.ones(dst.numel(), dtype=x.dtype), accumulate=True)
    eattr = None
    if ea is not None:  # copies in the tests carry identical attributes
        eattr = torch.zeros(n, n, ea.shape[1], dtype=x.dtype)
        eattr[dst, src] = ea
        we = layer.lin_edge(eattr).view(n, n, h, c).permute(2, 0, 1, 3)  # (H, i, j, C)
    t = layer.temperature
    t = (t if isinstance(t, torch.Tensor) else torch.tensor(float(t))).to(x.dtype)
    t = t.expand(h).view(h, 1, 1)
    if layer.score == "dot":
        q = layer.lin_query(x).view(n, h, c).transpose(0, 1)
        k = layer.lin_key(x).view(n, h, c).transpose(0, 1)
        v = layer.lin_value(x).view(n, h, c).transpose(0, 1)
        logit = q @ k.transpose(1, 2) / math.sqrt(c)
        if eattr is not None:
            logit = logit + (q.unsqueeze(2) * we).sum(-1) / math.sqrt(c)
        logit = logit / t
    elif layer.score == "additive":
        hx = layer.lin(x).view(n, h, c)
        a_s = (hx * layer.att_src).sum(-1).t()
        a_d = (hx * layer.att_dst).sum(-1).t()
        pre = a_d.unsqueeze(2) + a_s.unsqueeze(1)
        if eattr is not None:
            pre = pre + (we * layer.att_edge.view(h, 1, 1, c)).sum(-1)
        logit = F.leaky_relu(pre, layer.negative_slope) / t
        v = hx.transpose(0, 1)
    else:
        xs = layer.lin_src(x).view(n, h, c).transpose(0, 1)
        xd = layer.lin_dst(x).view(n, h, c).transpose(0, 1)
        z = xd.unsqueeze(2) + xs.unsqueeze(1)
        if eattr is not None:
            z = z + we
        logit = (F.leaky_relu(z, layer.negative_slope) * layer.att.view(h, 1, 1, c)).sum(-1) / t
        v = xs
    out_deg = mult.sum(0).clamp(min=1)
    in_deg = mult.sum(1).clamp(min=1)
    if layer.degree_norm == "log":
        logit = logit - torch.log(out_deg).view(1, 1, n)
    elif layer.degree_norm == "sym":
        logit = logit - 0.5 * (torch.log(in_deg).view(1, n, 1) + torch.log(out_deg).view(1, 1, n))
    mask = mult > 0
    logit = logit + torch.log(mult.clamp(min=1))
    logit = logit.masked_fill(~mask, float("-inf"))
    m = logit.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(logit - m)
    w = p / p.sum(-1, keepdim=True).clamp(min=1e-300)
    out = (w @ v).transpose(0, 1)  # (N, H, C)
    out = out.reshape(n, h * c) if layer.concat else out.mean(1)
    if layer.lin_residual is not None:
        out = out + layer.lin_residual(x)
    if layer.bias is not None:
        out = out + layer.bias
    per_copy = w / mult.clamp(min=1)
    weights = per_copy[:, ei[1], ei[0]].t()  # input self loops: compared separately
    return out, weights


def _randomize(layer: GraphAttention, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "temperature":
                continue
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.7)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("config", [
    {},
    {"degree_norm": "log", "concat": False},
    {"degree_norm": "sym", "residual": True},
    {"edge_dim": 3},
    {"edge_dim": 2, "degree_norm": "log", "add_self_loops": False},
    {"temperature": torch.tensor([0.5, 1.0, 3.0])},
])
def test_matches_dense_reference(score, config):
    torch.manual_seed(0)
    layer = GraphAttention(5, 4, heads=3, score=score, **config).double()
    _randomize(layer)
    ei = _graph()
    x = torch.randn(7, 5, dtype=torch.float64)
    ea = None
    if layer.edge_dim:
        ea = torch.randn(ei.shape[1], layer.edge_dim, dtype=torch.float64)
        ea[-3:] = ea[:3]  # duplicated edges carry identical attributes
    out, w = layer(x, ei, ea, return_weights=True)
    ref_out, ref_w = dense_reference(layer, x, ei, ea)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    keep = ei[0] != ei[1] if layer.add_self_loops else torch.ones(ei.shape[1], dtype=torch.bool)
    torch.testing.assert_close(w[keep], ref_w[keep], rtol=1e-10, atol=1e-10)


def test_input_self_loops_are_replaced():
    layer = GraphAttention(5, 4, heads=2, score="additive").double()
    ei = _graph(loops=False, dup=False)
    with_loops = torch.cat([ei, torch.tensor([[2, 4], [2, 4]])], 1)
    x = torch.randn(7, 5, dtype=torch.float64)
    out1, w1 = layer(x, ei, return_weights=True)
    out2, w2 = layer(x, with_loops, return_weights=True)
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(w1, w2[: ei.shape[1]])
    # a removed loop reports the added loop's weight: the rest of its node's row
    for col, node in ((-2, 2), (-1, 4)):
        other = w1[ei[1] == node].sum(0)
        torch.testing.assert_close(w2[col], 1 - other)


@pytest.mark.parametrize("score", SCORES)
def test_gradcheck(score):
    torch.manual_seed(0)
    temp = torch.nn.Parameter(torch.tensor([0.7, 1.6], dtype=torch.float64))
    layer = GraphAttention(3, 2, heads=2, score=score, edge_dim=2, degree_norm="log",
                           temperature=temp).double()
    _randomize(layer, 3)
    ei = _graph(n=5, e=10, seed=2)
    ea = torch.randn(ei.shape[1], 2, dtype=torch.float64)
    ea[-3:] = ea[:3]
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, t):
        with torch.no_grad():
            layer.temperature.copy_(t)
        return layer(x, ei, ea)

    assert torch.autograd.gradcheck(lambda x: layer(x, ei, ea), (x,))
    # gradient with respect to the (learned, per-head) temperature against finite differences
    out = layer(x, ei, ea).sum()
    (g,) = torch.autograd.grad(out, temp)
    eps = 1e-6
    for hidx in range(2):
        d = torch.zeros(2, dtype=torch.float64)
        d[hidx] = eps
        base = temp.detach().clone()
        hi = fn(x, base + d).sum().item()
        lo = fn(x, base - d).sum().item()
        fn(x, base)
        assert abs((hi - lo) / (2 * eps) - g[hidx].item()) < 1e-6


def _star(k=6):
    """Target 0 with neighbours: hub 1 (linked to leaves 3..3+k) and leaf 2."""
    edges = [(1, 0), (2, 0), (0, 1), (0, 2)]
    edges += [(1, j) for j in range(3, 3 + k)] + [(j, 1) for j in range(3, 3 + k)]
    return torch.tensor(edges).t(), 3 + k


@pytest.mark.parametrize("norm,power", [(None, 0.0), ("log", 1.0), ("sym", 0.5)])
def test_degree_norm_on_star(norm, power):
    ei, n = _star()
    layer = GraphAttention(4, 3, heads=1, score="additive", degree_norm=norm).double()
    with torch.no_grad():  # constant scores: only the degree term differs between neighbours
        layer.att_src.zero_()
        layer.att_dst.zero_()
    x = torch.randn(n, 4, dtype=torch.float64)
    _, w = layer(x, ei, return_weights=True)
    w_hub = w[0, 0].item()  # edge (1 -> 0)
    w_leaf = w[1, 0].item()  # edge (2 -> 0)
    out_deg = torch.bincount(ei[0], minlength=n) + 1  # with the self loop
    expect = (out_deg[2] / out_deg[1]).item() ** power
    assert w_hub / w_leaf == pytest.approx(expect, rel=1e-12)
    if norm is not None:
        assert w_hub < w_leaf


def test_temperature_flattens_on_star():
    ei, n = _star(10)
    x = torch.randn(n, 4, dtype=torch.float64)
    entropies = []
    for t in (0.25, 1.0, 4.0, 1e6):
        torch.manual_seed(0)
        layer = GraphAttention(4, 3, heads=1, score="dot", temperature=t).double()
        _randomize(layer, 5)
        _, w = layer(x, ei, return_weights=True)
        hub_in = w[ei[1] == 1, 0]  # the hub's weights over its incoming edges
        p = torch.cat([hub_in, 1 - hub_in.sum().view(1)])  # plus its self loop
        entropies.append(-(p * p.clamp(min=1e-300).log()).sum().item())
    assert entropies[0] < entropies[1] < entropies[2] < entropies[3]
    assert entropies[3] == pytest.approx(math.log(12), rel=1e-5)  # uniform over 11 + loop


def test_isolated_nodes_defined():
    ei = torch.tensor([[0, 1], [1, 0]])
    x = torch.randn(4, 3)
    for score in SCORES:
        layer = GraphAttention(3, 2, heads=2, score=score, add_self_loops=False, residual=True)
        with torch.no_grad():
            layer.bias.normal_()
        out = layer(x, ei)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[2:], layer.lin_residual(x[2:]) + layer.bias)
        out = GraphAttention(3, 2, score=score)(x, ei)  # self loops: isolated nodes see self
        assert torch.isfinite(out).all()
    empty = GraphAttention(3, 2)(x, torch.zeros(2, 0, dtype=torch.long))
    assert torch.isfinite(empty).all()


def test_bad_inputs():
    layer = GraphAttention(3, 2, heads=2)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="node 4"):
        layer(x, torch.tensor([[0, 4], [1, 0]]))
    with pytest.raises(ValueError, match="negative"):
        layer(x, torch.tensor([[0, -1], [1, 0]]))
    with pytest.raises(ValueError, match=r"\(2, E\)"):
        layer(x, torch.tensor([[0, 1], [1, 0], [2, 2]]))
    with pytest.raises(ValueError, match=r"\(2, E\)"):
        layer(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        layer(x, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="3 features"):
        layer(torch.randn(4, 5), torch.tensor([[0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(4), torch.tensor([[0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="edge_dim=None"):
        layer(x, torch.tensor([[0, 1], [1, 0]]), torch.randn(2, 2))
    with pytest.raises(ValueError, match="edge_attr"):
        GraphAttention(3, 2, edge_dim=2)(x, torch.tensor([[0, 1], [1, 0]]), torch.randn(3, 2))
    with pytest.raises(ValueError, match="score"):
        GraphAttention(3, 2, score="cosine")
    with pytest.raises(ValueError, match="degree_norm"):
        GraphAttention(3, 2, degree_norm="lin")
    with pytest.raises(ValueError, match="temperature"):
        GraphAttention(3, 2, heads=2, temperature=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="temperature"):
        GraphAttention(3, 2, temperature=-1.0)


def test_prebuilt_index_matches():
    layer = GraphAttention(5, 4, heads=2, score="additive").double()
    ei = _graph()
    x = torch.randn(7, 5, dtype=torch.float64)
    g = build_graph_index(ei, 7)
    torch.testing.assert_close(layer(x, g), layer(x, ei))
    with pytest.raises(ValueError, match="nodes"):
        layer(torch.randn(8, 5, dtype=torch.float64), g)


# --------------------------------------------------------------------------------- PyG


def _pyg():
    return pytest.importorskip("torch_geometric.nn")


@pytest.mark.parametrize("edge", [False, True])
def test_pyg_gatconv_equivalence(edge):
    pyg = _pyg()
    torch.manual_seed(0)
    ei = _graph(n=30, e=150)
    x = torch.randn(30, 8, dtype=torch.float64)
    kw = {"edge_dim": 3} if edge else {}
    ea = torch.randn(ei.shape[1], 3, dtype=torch.float64) if edge else None
    if edge:
        ea[-3:] = ea[:3]
    peer = pyg.GATConv(8, 5, heads=3, **kw).double()
    ours = GraphAttention(8, 5, heads=3, score="additive", **kw).double()
    with torch.no_grad():
        ours.lin.weight.copy_(peer.lin.weight)
        ours.att_src.copy_(peer.att_src[0])
        ours.att_dst.copy_(peer.att_dst[0])
        ours.bias.copy_(peer.bias)
        if edge:
            ours.lin_edge.weight.copy_(peer.lin_edge.weight)
            ours.att_edge.copy_(peer.att_edge[0])
    args = (ea,) if edge else ()
    p_out, (p_ei, p_alpha) = peer(x, ei, *args, return_attention_weights=True)
    o_out, o_w = ours(x, ei, *args, return_weights=True)
    torch.testing.assert_close(o_out, p_out, rtol=1e-10, atol=1e-10)
    keep = ei[0] != ei[1]
    # PyG returns its kept input edges first (in order), then the added loops
    torch.testing.assert_close(o_w[keep], p_alpha[: int(keep.sum())], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("edge", [False, True])
def test_pyg_gatv2_equivalence(edge):
    pyg = _pyg()
    ei = _graph(n=30, e=150, seed=3)
    x = torch.randn(30, 8, dtype=torch.float64)
    kw = {"edge_dim": 2} if edge else {}
    ea = torch.randn(ei.shape[1], 2, dtype=torch.float64) if edge else None
    if edge:
        ea[-3:] = ea[:3]
    peer = pyg.GATv2Conv(8, 5, heads=2, concat=False, **kw).double()
    ours = GraphAttention(8, 5, heads=2, score="additive_v2", concat=False, **kw).double()
    with torch.no_grad():
        ours.lin_src.load_state_dict(peer.lin_l.state_dict())
        ours.lin_dst.load_state_dict(peer.lin_r.state_dict())
        ours.att.copy_(peer.att[0])
        ours.bias.copy_(peer.bias)
        if edge:
            ours.lin_edge.weight.copy_(peer.lin_edge.weight)
    args = (ea,) if edge else ()
    torch.testing.assert_close(ours(x, ei, *args), peer(x, ei, *args), rtol=1e-10, atol=1e-10)


def test_pyg_transformerconv_equivalence():
    pyg = _pyg()
    ei = _graph(n=30, e=150, seed=4)
    x = torch.randn(30, 8, dtype=torch.float64)
    peer = pyg.TransformerConv(8, 5, heads=3).double()
    ours = GraphAttention(8, 5, heads=3, score="dot", add_self_loops=False, residual=True).double()
    with torch.no_grad():
        ours.lin_query.load_state_dict(peer.lin_query.state_dict())
        ours.lin_key.load_state_dict(peer.lin_key.state_dict())
        ours.lin_value.load_state_dict(peer.lin_value.state_dict())
        ours.lin_residual.weight.copy_(peer.lin_skip.weight)
        ours.bias.copy_(peer.lin_skip.bias)
    torch.testing.assert_close(ours(x, ei), peer(x, ei), rtol=1e-10, atol=1e-10)
