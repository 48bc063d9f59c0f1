"""Graph attention on protein interaction networks: models, loaders, a synthetic
PPI-like generator and the ``ppi`` / ``hubs`` / ``planetoid`` experiments."""

from __future__ import annotations

from .loaders import GraphData, load_edge_list, load_planetoid, load_ppi, save_ppi
from .models import GAT, GCN, GraphSAGE, MeanAggregation

__all__ = ["GAT", "GCN", "GraphSAGE", "MeanAggregation", "GraphData", "load_ppi", "save_ppi",
           "load_planetoid", "load_edge_list"]
