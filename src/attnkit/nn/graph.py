"""Graph attention as a thin layer over the engine's exact sparse attention.

:class:`GraphAttention` scores each neighbour ``j`` of a node ``i`` (edge ``j -> i``, PyG's
``edge_index`` convention) and averages the neighbours' values with the softmax of those scores.
Every score type runs through :func:`attnkit.attention` with the ``graph`` pattern, so the softmax
is the engine's exact segment softmax over each node's neighbour list:

* ``"dot"``: ``q_i . k_j / sqrt(C)`` (as in ``TransformerConv``);
* ``"additive"``: ``LeakyReLU(a_dst . W x_i + a_src . W x_j)`` (GAT, ``GATConv``). The
  pre-activation is a 2-dimensional dot product ``[a_dst_i, 1] . [1, a_src_j]``, so the engine
  computes it directly and ``score_mod`` only applies the LeakyReLU;
* ``"additive_v2"``: ``a . LeakyReLU(W_dst x_i + W_src x_j)`` (GATv2, ``GATv2Conv``), computed in
  ``score_mod`` from node features gathered by the engine's ``q_idx`` / ``k_idx``;
* ``"constant"``: 0 for every neighbour, i.e. uniform weights over the neighbours (Const-GAT of
  Velickovic et al. 2018: the same layer with attention switched off; the value projection is
  the ``"dot"`` layer's ``lin_value``).

The graph may be given as an ``edge_index``, a PyTorch Geometric ``Data`` (``layer(data)`` or
``layer(x, data)``), or a sparse adjacency (see :func:`attnkit.patterns.graph`); torch_geometric
is never imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import patterns
from ..checks import check_positive_int
from ..functional import attention, check_temperature
from ..patterns import _is_pyg_data, _require_integer, edge_index_of

__all__ = ["GraphAttention", "GraphIndex", "build_graph_index"]

SCORES = ("dot", "additive", "additive_v2", "constant")
DEGREE_NORMS = (None, "log", "sym")


# --------------------------------------------------------------------------------- structure


@dataclass
class GraphIndex:
    """The edge structure a layer attends over, in the engine's CSR order.

    Pairs are the distinct ``(src, dst)`` edges (plus one self loop per node when requested),
    sorted by target then source: exactly the order of the engine's ``SparseWeights``.

    Attributes:
        num_nodes: ``N``.
        pattern: the engine pattern (``patterns.graph``) over the pairs.
        keys: ``(P,)`` sorted ``dst * N + src`` of each pair.
        src, dst: ``(P,)`` endpoints of each pair.
        multiplicity: ``(P,)`` how many input edges (or added self loops) each pair stands for.
        edge_pair: ``(E,)`` pair id of each input edge (a removed input self loop maps to the
            node's added self loop).
        out_degree: ``(N,)`` float, edges leaving each node (with multiplicity and self loops).
        in_degree: ``(N,)`` float, edges entering each node.
        has_duplicates: whether any pair has multiplicity > 1.
    """

    num_nodes: int
    pattern: patterns.Pattern
    keys: Tensor
    src: Tensor
    dst: Tensor
    multiplicity: Tensor
    edge_pair: Tensor
    out_degree: Tensor
    in_degree: Tensor
    has_duplicates: bool

    def lookup(self, q_idx: Tensor, k_idx: Tensor) -> Tensor:
        """Pair ids of allowed ``(query, key)`` index tensors (same shape)."""
        key = (q_idx * self.num_nodes + k_idx).contiguous()
        if key.numel() == self.keys.numel() and torch.equal(key.view(-1), self.keys):
            # the engine visits every pair in CSR order, which is the order of self.keys
            return torch.arange(key.numel(), device=key.device).view(key.shape)
        return torch.searchsorted(self.keys, key)


def check_edge_index(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Validate a PyG ``edge_index`` ``(2, E)`` against ``num_nodes``; return it as ``long``."""
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a torch.Tensor, got {type(edge_index).__name__}")
    _require_integer("edge_index", edge_index)
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}")
    ei = edge_index.long()
    if ei.numel():
        lo, hi = int(ei.min()), int(ei.max())
        if lo < 0:
            raise ValueError(f"edge_index has a negative node index ({lo})")
        if hi >= num_nodes:
            raise ValueError(
                f"edge_index refers to node {hi} but x has only {num_nodes} nodes "
                f"(indices must be in [0, {num_nodes}))"
            )
    return ei


def build_graph_index(
    edge_index: Tensor, num_nodes: int, add_self_loops: bool = True
) -> GraphIndex:
    """Merge duplicate edges, optionally replace self loops by one per node, and map each input
    edge to its pair. ``edge_index (2, E)`` follows PyG (row 0 sources, row 1 targets)."""
    ei = check_edge_index(edge_index, num_nodes)
    n = num_nodes
    device = ei.device
    src, dst = ei[0], ei[1]
    keep = torch.ones_like(src, dtype=torch.bool)
    if add_self_loops:  # as GATConv: drop the given self loops, add exactly one per node
        keep = src != dst
        loops = torch.arange(n, device=device)
        src = torch.cat([src[keep], loops])
        dst = torch.cat([dst[keep], loops])
    key = dst * max(n, 1) + src
    keys, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    if add_self_loops:
        edge_pair = torch.empty(ei.shape[1], dtype=torch.long, device=device)
        n_kept = int(keep.sum())
        edge_pair[keep] = inverse[:n_kept]
        # a removed input self loop (i, i) reports the weight of the node's added loop
        edge_pair[~keep] = inverse[n_kept:][ei[0][~keep]]
    else:
        edge_pair = inverse
    pair_src, pair_dst = keys % max(n, 1), keys // max(n, 1)
    counts_f = counts.to(torch.float64)
    out_degree = torch.zeros(n, dtype=torch.float64, device=device).index_add(0, pair_src, counts_f)
    in_degree = torch.zeros(n, dtype=torch.float64, device=device).index_add(0, pair_dst, counts_f)
    # keys are distinct, in range and sorted by (dst, src): the pattern can take them as they are
    pattern = patterns.Graph.from_sorted_pairs(pair_src, pair_dst, n)
    return GraphIndex(
        num_nodes=n, pattern=pattern, keys=keys, src=pair_src, dst=pair_dst,
        multiplicity=counts, edge_pair=edge_pair, out_degree=out_degree, in_degree=in_degree,
        has_duplicates=bool((counts > 1).any()),
    )


def _flat_pair_index(score: Tensor, q_idx: Tensor, k_idx: Tensor) -> tuple[Tensor, Tensor, tuple]:
    """Broadcast the engine's index tensors to ``score.shape[2:]`` and flatten them.

    The indices do not depend on batch or head, so their leading dims are dropped.
    Returns ``(qi (M,), kj (M,), rest)`` with ``rest = score.shape[2:]``."""
    rest = tuple(score.shape[2:])
    qb, kb = torch.broadcast_tensors(q_idx, k_idx)
    while qb.dim() > len(rest):
        qb, kb = qb[0], kb[0]
    return qb.expand(rest).reshape(-1), kb.expand(rest).reshape(-1), rest


# --------------------------------------------------------------------------------- layer


class GraphAttention(nn.Module):
    r"""Multi-head graph attention over the edges of a graph (PyG ``edge_index`` convention).

    For target node ``i`` with neighbours ``j`` (edges ``j -> i``), head ``h`` computes

    ``logit_ij = score_ij / T_h + degree_term_ij + log(m_ij)``, ``w_ij = softmax_j(logit_ij)``,
    ``out_i = sum_j w_ij v_j`` (then heads concatenated or averaged, plus bias and residual),

    where ``score_ij`` is the chosen score (see the module docstring), ``T_h`` the temperature,
    ``m_ij`` the number of input edges ``j -> i`` and ``degree_term_ij`` (``deg`` counts edges
    with multiplicity, self loops included, so it is >= 1 for every node that has an edge):

    * ``degree_norm=None``: 0;
    * ``"log"``: ``-log(out_deg_j)``, i.e. ``w_ij`` proportional to ``exp(score_ij) / deg_j``:
      a neighbour that talks to ``d`` nodes has its vote divided by ``d`` (the random-walk
      normalization of GCN/GraphSAGE, applied inside the softmax);
    * ``"sym"``: ``-0.5 * (log(in_deg_i) + log(out_deg_j))``, GCN's symmetric
      ``1/sqrt(deg_i deg_j)`` in log space. The ``deg_i`` part is constant over a softmax row and
      cancels, so the weights are ``exp(score_ij) / sqrt(deg_j)`` normalized: a half-strength
      ``"log"``.

    Temperature ``T > 1`` flattens each head's attention, ``T < 1`` sharpens it; it divides the
    score only, not the degree term.

    Duplicate edges count separately, as in PyG's softmax: the engine merges a repeated pair into
    one entry, and the ``+ log(m_ij)`` term gives that entry exactly the total weight of its
    ``m_ij`` copies. With ``edge_attr``, copies of one pair are scored with the mean of their
    attributes (identical to PyG when the copies carry the same attributes).
    ``add_self_loops=True`` (as ``GATConv``) drops the given self loops and adds one per node, its
    ``edge_attr`` the mean of the node's incoming attributes (PyG's ``fill_value="mean"``).

    Edge features (``edge_dim``) enter the score only: GAT/GATv2 add ``W_e e_ij`` as PyG does
    (``a_edge . W_e e_ij`` inside the LeakyReLU for GAT, added to ``W_dst x_i + W_src x_j`` for
    GATv2); ``"dot"`` adds ``q_i . W_e e_ij / sqrt(C)`` to the score.

    A node with no incoming edge (only possible with ``add_self_loops=False``) aggregates
    nothing: its output is ``bias`` (+ residual), never NaN.

    Args:
        in_dim: input features ``F``. out_dim: features per head ``C``. heads: ``H``.
        score: ``"dot"``, ``"additive"``, ``"additive_v2"`` or ``"constant"``.
        concat: concatenate heads (output ``H*C``) or average them (output ``C``).
        dropout: dropout on the attention weights (training only).
        edge_dim: edge feature size, or None.
        degree_norm: ``None``, ``"log"`` or ``"sym"`` (above).
        temperature: a float > 0, or a ``(H,)`` tensor (an ``nn.Parameter`` is learned).
        residual: add a linear projection of the input (no bias) to the output.
        negative_slope: LeakyReLU slope of the additive scores (0.2 as in GAT).
        bias: learnable output bias.

    Shapes: ``x (N, F)``, ``edge_index (2, E)`` integer, ``edge_attr (E, edge_dim)``; output
    ``(N, H*C)`` or ``(N, C)``; weights ``(E, H)`` in input edge order (each copy of a duplicate
    edge gets ``1/m`` of the merged weight; a removed input self loop reports its node's added
    loop). With self loops added, the weight of node ``i``'s own loop is ``1 -`` the sum of its
    other incoming weights.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        heads: int = 1,
        score: str = "dot",
        concat: bool = True,
        dropout: float = 0.0,
        add_self_loops: bool = True,
        edge_dim: int | None = None,
        degree_norm: str | None = None,
        temperature: float | Tensor = 1.0,
        residual: bool = False,
        negative_slope: float = 0.2,
        bias: bool = True,
    ):
        super().__init__()
        for name, val in (("in_dim", in_dim), ("out_dim", out_dim), ("heads", heads)):
            check_positive_int(name, val)
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if score == "constant" and edge_dim is not None:
            raise ValueError("edge_dim must be None with score='constant': edge features only "
                             "enter the score, which is constant")
        if degree_norm not in DEGREE_NORMS:
            raise ValueError(f"degree_norm must be one of {DEGREE_NORMS}, got {degree_norm!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if edge_dim is not None and (isinstance(edge_dim, bool) or not isinstance(edge_dim, int)
                                     or edge_dim < 1):
            raise ValueError(f"edge_dim must be None or an int >= 1, got {edge_dim!r}")
        if (isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float))
                or not math.isfinite(negative_slope)):
            raise ValueError(f"negative_slope must be a finite float, got {negative_slope!r}")
        self.in_dim, self.out_dim, self.heads = in_dim, out_dim, heads
        self.score, self.concat, self.dropout = score, concat, float(dropout)
        self.add_self_loops, self.edge_dim = add_self_loops, edge_dim
        self.degree_norm, self.negative_slope = degree_norm, float(negative_slope)
        hc = heads * out_dim
        if score == "dot":
            self.lin_query = nn.Linear(in_dim, hc)
            self.lin_key = nn.Linear(in_dim, hc)
            self.lin_value = nn.Linear(in_dim, hc)
        elif score == "constant":
            self.lin_value = nn.Linear(in_dim, hc)
        elif score == "additive":
            self.lin = nn.Linear(in_dim, hc, bias=False)
            self.att_src = nn.Parameter(torch.empty(heads, out_dim))
            self.att_dst = nn.Parameter(torch.empty(heads, out_dim))
        else:
            self.lin_src = nn.Linear(in_dim, hc)
            self.lin_dst = nn.Linear(in_dim, hc)
            self.att = nn.Parameter(torch.empty(heads, out_dim))
        if edge_dim is not None:
            self.lin_edge = nn.Linear(edge_dim, hc, bias=False)
            if score == "additive":
                self.att_edge = nn.Parameter(torch.empty(heads, out_dim))
        out_features = hc if concat else out_dim
        self.lin_residual = nn.Linear(in_dim, out_features, bias=False) if residual else None
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._set_temperature(temperature)
        self.reset_parameters()

    def _set_temperature(self, temperature: float | Tensor) -> None:
        check_temperature(temperature, self.heads)
        if isinstance(temperature, Tensor):
            if isinstance(temperature, nn.Parameter):
                self.temperature = temperature
            else:
                self.register_buffer("temperature", temperature.detach().clone().float())
        else:
            self.temperature = float(temperature)

    def reset_parameters(self) -> None:
        for name in ("att_src", "att_dst", "att", "att_edge"):
            p = getattr(self, name, None)
            if p is not None:  # glorot, as GATConv
                bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))
                nn.init.uniform_(p, -bound, bound)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    # ----------------------------------------------------------------------------- forward

    def _temperature_tensor(self, like: Tensor) -> Tensor | float:
        t = self.temperature
        if isinstance(t, Tensor):
            return t.to(like.dtype).reshape(-1) if t.numel() > 1 else t.to(like.dtype).reshape(())
        return t

    def forward(
        self,
        x,
        edge_index=None,
        edge_attr: Tensor | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x (N, in_dim)`` (dense, or sparse CSR/COO), ``edge_index (2, E)`` (or a prebuilt
        :class:`GraphIndex`, a PyG ``Data``, a sparse ``(N, N)`` adjacency), ``edge_attr
        (E, edge_dim)``. ``layer(data)`` takes ``x``, ``edge_index`` and (when the layer has
        ``edge_dim``) ``edge_attr`` from a PyG ``Data``. Returns ``(N, H*C)`` (``(N, C)``
        without concat) and, with ``return_weights``, the weights ``(E, H)`` of the input edges
        (see the class docstring; for an adjacency, in the order of its coalesced entries).
        """
        if _is_pyg_data(x):
            if edge_index is not None:
                raise ValueError("edge_index must not be given with a Data object as x: the "
                                 "layer takes it from the Data")
            data = x
            x, edge_index = getattr(data, "x", None), data
            if edge_attr is None and self.edge_dim is not None:
                edge_attr = getattr(data, "edge_attr", None)
            if x is None:
                raise ValueError("x: the Data object has no node features x")
        if edge_index is None:
            raise TypeError("edge_index is required (a (2, E) tensor, GraphIndex, PyG Data or "
                            "sparse adjacency)")
        if not isinstance(x, Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a floating-point tensor (N, {self.in_dim}), got {shape}")
        if x.shape[1] != self.in_dim:
            raise ValueError(f"x must have {self.in_dim} features per node, got {x.shape[1]}")
        if x.layout not in (torch.strided, torch.sparse_csr, torch.sparse_coo):
            raise TypeError(f"x must be a dense, sparse CSR or sparse COO tensor, got {x.layout}")
        # a sparse x (e.g. bag-of-words features) only enters the input projections
        like = x if x.layout == torch.strided else torch.empty(0, dtype=x.dtype, device=x.device)
        n = x.shape[0]
        if not isinstance(edge_index, (Tensor, GraphIndex)) or (
                isinstance(edge_index, Tensor) and edge_index.layout != torch.strided):
            edge_index, _ = edge_index_of(edge_index, n)  # Data, sparse adjacency, lists
        if isinstance(edge_index, GraphIndex):
            if edge_index.num_nodes != n:
                raise ValueError(f"GraphIndex is for {edge_index.num_nodes} nodes, x has {n}")
            graph = edge_index
        else:
            graph = build_graph_index(edge_index, n, self.add_self_loops)
        n_edges = graph.edge_pair.numel()
        if self.edge_dim is None and edge_attr is not None:
            raise ValueError("edge_attr given, but the layer was built with edge_dim=None")
        if self.edge_dim is not None:
            if edge_attr is None:
                raise ValueError(f"edge_attr (E, {self.edge_dim}) is required (edge_dim is set)")
            if edge_attr.dim() == 1 and self.edge_dim == 1:
                edge_attr = edge_attr.unsqueeze(-1)
            if edge_attr.dim() != 2 or tuple(edge_attr.shape) != (n_edges, self.edge_dim):
                raise ValueError(
                    f"edge_attr must have shape (E, edge_dim) = {(n_edges, self.edge_dim)}, "
                    f"got {tuple(edge_attr.shape)}"
                )

        h, c = self.heads, self.out_dim
        temp = self._temperature_tensor(like)
        extra = self._pair_terms(graph, x, edge_attr)  # (H, P) pre-temperature term or None
        post = self._post_terms(graph, x.dtype)  # (vector, per_pair) or None
        slope = self.negative_slope
        lookup_needed = extra is not None or (post is not None and post[1])

        def gather_post(score, q_idx, k_idx):
            qi, kj, rest = _flat_pair_index(score, q_idx, k_idx)
            pid = graph.lookup(qi, kj) if lookup_needed else None
            return qi, kj, rest, pid

        if self.score == "dot":
            q = self.lin_query(x).view(n, h, c).transpose(0, 1).unsqueeze(0)
            k = self.lin_key(x).view(n, h, c).transpose(0, 1).unsqueeze(0)
            v = self.lin_value(x).view(n, h, c).transpose(0, 1).unsqueeze(0)
            scale = 1.0 / math.sqrt(c)
            tvec = _per_head(temp, h, like)

            def score_mod(s, b, hh, q_idx, k_idx):
                qi, kj, rest, pid = gather_post(s, q_idx, k_idx)
                if extra is not None:  # q_i . W_e e_ij * scale / T
                    qg = q[0].index_select(1, qi)  # (H, M, C)
                    term = (qg * extra.index_select(1, pid)).sum(-1) * (scale / tvec.view(-1, 1))
                    s = s + term.view(1, h, *rest)
                return _add_post(s, post, kj, pid, rest)

            mod = score_mod if (extra is not None or post is not None) else None
            out, weights = _run(q, k, v, graph, mod, scale, temp, self, return_weights)
        elif self.score == "constant":
            v = self.lin_value(x).view(n, h, c).transpose(0, 1).unsqueeze(0)
            zeros = like.new_zeros(1, h, n, 1)  # every score 0: uniform over the neighbours

            def score_mod(s, b, hh, q_idx, k_idx):  # only degree / multiplicity terms
                qi, kj, rest, pid = gather_post(s, q_idx, k_idx)
                return _add_post(s, post, kj, pid, rest)

            mod = score_mod if post is not None else None
            out, weights = _run(zeros, zeros, v, graph, mod, 1.0, 1.0, self, return_weights)
        elif self.score == "additive":
            hx = self.lin(x).view(n, h, c)
            a_src = (hx * self.att_src).sum(-1).t()  # (H, N)
            a_dst = (hx * self.att_dst).sum(-1).t()
            ones = torch.ones_like(a_src)
            # [a_dst_i, 1] . [1, a_src_j] = a_dst_i + a_src_j: the engine's dot product
            q = torch.stack([a_dst, ones], -1).unsqueeze(0)  # (1, H, N, 2)
            k = torch.stack([ones, a_src], -1).unsqueeze(0)
            v = hx.transpose(0, 1).unsqueeze(0)
            tvec = _per_head(temp, h, like)

            def score_mod(s, b, hh, q_idx, k_idx):
                qi, kj, rest, pid = gather_post(s, q_idx, k_idx)
                if extra is not None:  # a_edge . W_e e_ij inside the LeakyReLU (/T: see above)
                    s = s + (extra.index_select(1, pid) / tvec.view(-1, 1)).view(1, h, *rest)
                s = F.leaky_relu(s, slope)  # leaky(x / T) = leaky(x) / T for T > 0
                return _add_post(s, post, kj, pid, rest)

            out, weights = _run(q, k, v, graph, score_mod, 1.0, temp, self, return_weights)
        else:
            xs = self.lin_src(x).view(n, h, c).transpose(0, 1)  # (H, N, C): sources, values
            xd = self.lin_dst(x).view(n, h, c).transpose(0, 1)
            att = self.att
            tvec = _per_head(temp, h, like)

            def score_mod(s, b, hh, q_idx, k_idx):
                qi, kj, rest, pid = gather_post(s, q_idx, k_idx)
                z = xs.index_select(1, kj) + xd.index_select(1, qi)  # (H, M, C)
                if extra is not None:
                    z = z + extra.index_select(1, pid)
                logit = (F.leaky_relu(z, slope) * att.unsqueeze(1)).sum(-1) / tvec.view(-1, 1)
                return _add_post(logit.view(1, h, *rest).to(s.dtype), post, kj, pid, rest)

            zeros = like.new_zeros(1, h, n, 1)  # the score comes entirely from score_mod
            v = xs.unsqueeze(0)
            out, weights = _run(zeros, zeros, v, graph, score_mod, 1.0, 1.0, self, return_weights)

        out = out[0].transpose(0, 1)  # (N, H, C)
        out = out.reshape(n, h * c) if self.concat else out.mean(1)
        if self.lin_residual is not None:
            out = out + self.lin_residual(x)
        if self.bias is not None:
            out = out + self.bias
        if not return_weights:
            return out
        return out, weights

    def _pair_terms(self, graph: GraphIndex, x: Tensor, edge_attr: Tensor | None):
        """Per-pair edge term ``(H, P)`` (GAT: scalar ``a_edge . W_e e``; others ``(H, P, C)``)."""
        if self.edge_dim is None:
            return None
        h, c = self.heads, self.out_dim
        n_pairs = graph.keys.numel()
        ea = edge_attr.to(x.dtype)
        pair_attr = ea.new_zeros(n_pairs, ea.shape[1]).index_add(0, graph.edge_pair, ea)
        cnt = ea.new_zeros(n_pairs).index_add(0, graph.edge_pair, ea.new_ones(ea.shape[0]))
        if self.add_self_loops:  # loop attr: mean of the node's incoming (non-loop) attributes
            src_e = graph.src[graph.edge_pair]
            dst_e = graph.dst[graph.edge_pair]
            not_loop = src_e != dst_e
            n = graph.num_nodes
            node_sum = ea.new_zeros(n, ea.shape[1]).index_add(0, dst_e[not_loop], ea[not_loop])
            ones = ea.new_ones(int(not_loop.sum()))
            node_cnt = ea.new_zeros(n).index_add(0, dst_e[not_loop], ones)
            loop_pairs = graph.lookup(torch.arange(n, device=x.device),
                                      torch.arange(n, device=x.device))
            pair_attr = pair_attr.index_copy(0, loop_pairs, node_sum)
            cnt = cnt.index_copy(0, loop_pairs, node_cnt)
        pair_attr = pair_attr / cnt.clamp(min=1).unsqueeze(-1)
        e = self.lin_edge(pair_attr).view(n_pairs, h, c).transpose(0, 1)  # (H, P, C)
        if self.score == "additive":
            return (e * self.att_edge.unsqueeze(1)).sum(-1)  # (H, P)
        return e

    def _post_terms(self, graph: GraphIndex, dtype) -> tuple[Tensor, bool] | None:
        """``(term, per_pair)``: the logit term added after temperature. A per-key ``(N,)``
        vector for the degree term alone, else a per-pair ``(P,)`` vector."""
        deg_term = None
        if self.degree_norm == "log":
            deg_term = -torch.log(graph.out_degree.clamp(min=1))
        elif self.degree_norm == "sym":
            deg_term = -0.5 * torch.log(graph.out_degree.clamp(min=1))
            # the target's -0.5 log(in_deg_i) is constant per softmax row: it cancels exactly
        if not graph.has_duplicates:
            return None if deg_term is None else (deg_term.to(dtype), False)
        pair = torch.log(graph.multiplicity.to(torch.float64))
        if deg_term is not None:
            pair = pair + deg_term[graph.src]
        return pair.to(dtype), True

    def extra_repr(self) -> str:
        return (f"{self.in_dim}, {self.out_dim}, heads={self.heads}, score={self.score!r}, "
                f"concat={self.concat}, degree_norm={self.degree_norm!r}")


def _per_head(temp: float | Tensor, heads: int, like: Tensor) -> Tensor:
    """Temperature as a ``(H,)`` tensor (differentiable when it is a learned tensor)."""
    if isinstance(temp, Tensor):
        return temp.expand(heads) if temp.dim() == 0 else temp
    return like.new_full((heads,), float(temp))


def _add_post(s: Tensor, post: tuple[Tensor, bool] | None, kj: Tensor, pid: Tensor | None,
              rest: tuple) -> Tensor:
    """Add the post-temperature term: per key ``(N,)`` (indexed by ``kj``) or per pair."""
    if post is None:
        return s
    vec, per_pair = post
    term = vec.index_select(0, pid if per_pair else kj)
    return s + term.view(1, 1, *rest).to(s.dtype)


def _run(q, k, v, graph: GraphIndex, score_mod, scale, temp, layer: GraphAttention,
         return_weights: bool):
    """One engine call; per-edge weights ``(E, H)`` in input edge order when asked."""
    p = layer.dropout if layer.training else 0.0
    res = attention(q, k, v, pattern=graph.pattern, score_mod=score_mod, scale=scale,
                    temperature=temp, dropout_p=p, return_weights=return_weights)
    if not return_weights:
        return res, None
    out, sw = res
    # SparseWeights come in CSR order (target, then source): the same order as graph.keys.
    per_pair = sw.values[0]  # (H, P)
    share = graph.multiplicity.to(per_pair.dtype)
    per_edge = (per_pair / share).index_select(1, graph.edge_pair).t()  # (E, H)
    return out, per_edge
