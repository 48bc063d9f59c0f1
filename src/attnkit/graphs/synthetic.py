"""A generator of PPI-like graphs: the embedded default data of the graph experiments.

What it imitates in a protein-protein interaction network:

* heavy-tailed degrees with real hubs: a Chung-Lu graph whose expected degrees follow a
  power law (exponent ``degree_exponent``), so a few proteins touch a large share of edges;
* functional modules (complexes, pathways): most edges stay inside a node's module, and hubs
  are promiscuous (their edges leave the module more often, like "date" hubs);
* multi-label functions: each module carries a few functions; a protein has each function of
  its module with probability ``label_keep`` plus rare functions of its own;
* noisy features: a weak module signal plus Gaussian noise, so a node's own features are not
  enough and its neighbourhood (the right part of it) matters.

:func:`make_ppi_dataset` writes the graph in the GraphSAGE PPI format and reads it back through
:func:`attnkit.graphs.load_ppi`, so the loader is exercised on every run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .loaders import GraphData, load_ppi, save_ppi

__all__ = ["generate_ppi_like", "make_ppi_dataset", "cross_module_share"]


def generate_ppi_like(
    num_nodes: int = 2000,
    num_modules: int = 40,
    num_labels: int = 40,
    num_features: int = 50,
    avg_degree: float = 10.0,
    degree_exponent: float = 2.0,
    within_module: float = 0.7,
    hub_within_module: float = 0.3,
    functions_per_module: int = 3,
    label_keep: float = 0.85,
    label_noise: float = 0.01,
    feature_signal: float = 0.6,
    split: tuple[float, float] = (0.7, 0.15),
    seed: int = 0,
    return_modules: bool = False,
) -> GraphData | tuple[GraphData, Tensor]:
    """Generate one PPI-like graph (undirected, edges in both directions, no self loops).

    Args:
        num_nodes, num_modules, num_labels, num_features: sizes.
        avg_degree: target mean degree. degree_exponent: power-law exponent of the expected
            degrees (PPI networks: about 2-2.5).
        within_module: share of a node's edge endpoints chosen inside its module;
            hub_within_module: the same for the top 1% of nodes by expected degree.
        functions_per_module, label_keep, label_noise: the multi-label functions.
        feature_signal: strength of the module centroid in the features (noise has std 1).
        split: train and validation shares (the rest is test), drawn at random.
        seed: everything is deterministic given the seed.
        return_modules: also return each node's module ``(N,)`` long (e.g. to measure the
            share of cross-module neighbours, :func:`cross_module_share`).

    Returns:
        :class:`GraphData` with ``x (N, F)``, ``y (N, L)`` 0/1, masks and ``edge_index``
        (and the modules when asked).
    """
    if num_nodes < 10 or num_modules < 1 or num_labels < functions_per_module:
        raise ValueError("need num_nodes >= 10, num_modules >= 1, num_labels >= "
                         "functions_per_module")
    rng = np.random.default_rng(seed)
    n = num_nodes
    # expected degrees: Pareto tail (P(w > t) ~ t^(1 - exponent)), the largest capped at a
    # tenth of the nodes
    u = rng.random(n)
    w = (1.0 - u) ** (-1.0 / (degree_exponent - 1.0))
    w = w / w.mean() * avg_degree
    w = np.minimum(w, 0.1 * n)
    module = rng.integers(0, num_modules, n)
    hub_cut = np.quantile(w, 0.99)
    p_in = np.where(w >= hub_cut, hub_within_module, within_module)

    n_edges = int(n * avg_degree / 2)
    prob = w / w.sum()
    src = rng.choice(n, size=n_edges, p=prob)
    dst = rng.choice(n, size=n_edges, p=prob)  # global (cross-module) endpoints
    inside = rng.random(n_edges) < p_in[src]
    # inside the module: draw by weight among the source's module members
    order = np.argsort(module, kind="stable")
    starts = np.searchsorted(module[order], np.arange(num_modules))
    ends = np.searchsorted(module[order], np.arange(num_modules), side="right")
    cum = np.cumsum(w[order])
    for e in np.nonzero(inside)[0]:
        m = module[src[e]]
        lo, hi = starts[m], ends[m]
        base = cum[lo - 1] if lo else 0.0
        r = base + rng.random() * (cum[hi - 1] - base)
        dst[e] = order[min(hi - 1, int(np.searchsorted(cum, r)))]
    keep = src != dst
    a, b = src[keep], dst[keep]
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)]), axis=1)
    edge_index = torch.from_numpy(np.concatenate([pairs, pairs[::-1]], axis=1).astype(np.int64))

    functions = np.stack([rng.choice(num_labels, functions_per_module, replace=False)
                          for _ in range(num_modules)])
    y = np.zeros((n, num_labels), dtype=np.float32)
    has = rng.random((n, functions_per_module)) < label_keep
    rows = np.repeat(np.arange(n), functions_per_module)
    y[rows[has.ravel()], functions[module].ravel()[has.ravel()]] = 1.0
    y[rng.random((n, num_labels)) < label_noise] = 1.0

    centroids = rng.normal(size=(num_modules, num_features))
    x = feature_signal * centroids[module] + rng.normal(size=(n, num_features))

    perm = rng.permutation(n)
    n_train, n_val = int(split[0] * n), int(split[1] * n)
    masks = [np.zeros(n, dtype=bool) for _ in range(3)]
    masks[0][perm[:n_train]] = True
    masks[1][perm[n_train:n_train + n_val]] = True
    masks[2][perm[n_train + n_val:]] = True
    data = GraphData(
        x=torch.from_numpy(x.astype(np.float32)), edge_index=edge_index,
        y=torch.from_numpy(y), train_mask=torch.from_numpy(masks[0]),
        val_mask=torch.from_numpy(masks[1]), test_mask=torch.from_numpy(masks[2]),
        node_ids=list(range(n)),
    )
    return (data, torch.from_numpy(module.astype(np.int64))) if return_modules else data


def cross_module_share(edge_index: Tensor, module: Tensor) -> float:
    """Share of edges ``(2, E)`` whose endpoints lie in different modules: the share of
    neighbours that are misleading for a node's functions."""
    if edge_index.shape[1] == 0:
        return float("nan")
    return float((module[edge_index[0]] != module[edge_index[1]]).float().mean())


def make_ppi_dataset(directory: str | Path, prefix: str = "synthetic-ppi", **kwargs) -> GraphData:
    """Generate (see :func:`generate_ppi_like`), write in the PPI format under ``directory``,
    and return what :func:`load_ppi` reads back."""
    save_ppi(generate_ppi_like(**kwargs, return_modules=False), directory, prefix)
    return load_ppi(directory, prefix)
