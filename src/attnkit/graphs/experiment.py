"""Experiments of the graph application: ``ppi``, ``hubs`` and ``planetoid``.

``ppi`` and ``hubs`` run on the synthetic PPI-like generator with the parameters fixed in
:data:`PPI_GENERATOR` (the generator's defaults, set before these experiments were redesigned
and never tuned per model); every model gets the same training budget and early stopping, and
every comparison is paired by seed (same graph, same split).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..argtypes import existing_dir, one_of
from ..experiment import Experiment, Option, Result, RunContext, stats
from ..nn.graph import GraphIndex, build_graph_index
from .loaders import PLANETOID_NAMES, GraphData, load_planetoid
from .models import GAT, GCN, GraphSAGE, MeanAggregation, evaluate, fit
from .synthetic import cross_module_share, generate_ppi_like, make_ppi_dataset

# The score of the GAT in ppi/hubs: the engine's scaled dot product (TransformerConv's). An
# additive GAT score ranks a node's neighbours the same way for every target, so it cannot
# prefer same-module neighbours; a query-dependent score can. Const-GAT (score "constant") is
# the same stack with that score replaced by uniform weights.
PPI_SCORE = "dot"

#: The generator's parameters for ppi and hubs, fixed in advance (generate_ppi_like's defaults):
#: 40 modules, 40 functions (3 per module, kept with p = 0.85, 1% noise labels), 50 features
#: (module centroid x 0.6 + N(0, 1) noise), mean degree 10 with power-law exponent 2,
#: 70% of a node's edge endpoints inside its module (30% for the top 1% "hub" nodes).
PPI_GENERATOR = dict(num_modules=40, num_labels=40, num_features=50, avg_degree=10.0,
                     degree_exponent=2.0, within_module=0.7, hub_within_module=0.3,
                     functions_per_module=3, label_keep=0.85, label_noise=0.01,
                     feature_signal=0.6)
#: The regime curve varies only ``within_module`` (non-hub nodes): the nominal share of
#: misleading (cross-module) edge endpoints is 1 - within_module.
CROSS_SHARES_QUICK = (0.1, 0.3, 0.6)
CROSS_SHARES_FULL = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9)
MODEL_SIZES = dict(hidden=16, heads=4, layers=2, out_heads=2, dropout=0.1)


def _nodes(ctx: RunContext) -> int:
    return 700 if ctx.quick else 4000


def _budget(ctx: RunContext) -> dict:
    """The same training budget for every model: Adam, lr 0.01, early stopping on the
    validation loss (thresholded micro-F1 is flat-zero early in training)."""
    epochs, patience = (100, 20) if ctx.quick else (400, 30)
    return dict(epochs=epochs, lr=0.01, weight_decay=0.0, patience=patience, monitor="loss")


def _ppi_model(data: GraphData, kind: str, **kw) -> torch.nn.Module:
    s = MODEL_SIZES
    f, c = data.x.shape[1], data.y.shape[1]
    width = s["heads"] * s["hidden"]  # the baselines get the GAT's hidden width
    if kind == "gat":
        return GAT(f, s["hidden"], c, heads=s["heads"], layers=s["layers"],
                   out_heads=s["out_heads"], dropout=s["dropout"], multilabel=True,
                   score=kw.pop("score", PPI_SCORE), **kw)
    if kind == "const_gat":
        return GAT(f, s["hidden"], c, heads=s["heads"], layers=s["layers"],
                   out_heads=s["out_heads"], dropout=s["dropout"], multilabel=True,
                   score="constant", **kw)
    if kind == "mean":
        return MeanAggregation(f, s["hidden"], c, heads=s["heads"], layers=s["layers"],
                               dropout=s["dropout"], multilabel=True)
    if kind == "sage":
        return GraphSAGE(f, width, c, layers=s["layers"], dropout=s["dropout"], multilabel=True)
    if kind == "gcn":
        return GCN(f, width, c, layers=s["layers"], dropout=s["dropout"], multilabel=True)
    raise ValueError(f"unknown model kind {kind!r}")


def _train(kind: str, data: GraphData, graph: GraphIndex, ctx: RunContext, seed: int,
           **kw) -> torch.nn.Module:
    torch.manual_seed(seed)  # each model's initialisation and dropout depend on the seed only
    model = _ppi_model(data, kind, **kw)
    fit(model, data, graph=graph, **_budget(ctx))
    return model


# --------------------------------------------------------------------------------- ppi

PPI_MODELS = ("gat", "const_gat", "mean", "sage", "gcn")


def run_ppi(ctx: RunContext) -> Result:
    seeds = ctx.seed_list(quick=5, full=5)
    n = _nodes(ctx)
    keep: dict = {}

    def one_seed(seed: int) -> dict[str, float]:
        data = make_ppi_dataset(ctx.out_dir / "synthetic_ppi", seed=seed, num_nodes=n,
                                **PPI_GENERATOR)
        graph = build_graph_index(data.edge_index, data.num_nodes)
        out = {}
        for kind in PPI_MODELS:
            model = _train(kind, data, graph, ctx, seed)
            out[kind] = evaluate(model, data, data.test_mask, graph)
            if kind == "gat" and "gat" not in keep:
                keep["gat"], keep["data"] = model, data
        return out

    with stats.single_thread():
        per_seed = stats.over_seeds(one_seed, seeds, progress=ctx.progress, desc="ppi")
        curve = _regime_curve(ctx, seeds, per_seed)
    f1, gains, metrics, decisions = ppi_summary(per_seed)
    for row in curve:
        tag = f"{row['cross_share_nominal']:g}".replace(".", "p")
        metrics[f"gain_gat_over_const_at_cross_{tag}"] = row["gain"]
        metrics[f"gain_gat_over_const_at_cross_{tag}_ci_low"] = row["gain_ci_low"]
        metrics[f"gain_gat_over_const_at_cross_{tag}_ci_high"] = row["gain_ci_high"]
    table = [{"model": k, "test_micro_f1": round(float(np.mean(f1[k])), 4),
              "ci": f"[{stats.mean_ci(f1[k]).low:.4f}, {stats.mean_ci(f1[k]).high:.4f}]",
              "gat_minus_model": "" if k == "gat" else str(gains[k])} for k in PPI_MODELS]
    table += [{"model": f"regime: cross-module share {r['cross_share_nominal']:g} "
                        f"(measured {r['cross_share_measured']:.3f})",
               "test_micro_f1": f"GAT {r['gat']:.4f} / Const-GAT {r['const_gat']:.4f}",
               "gat_minus_model": f"{r['gain']:.4f} [{r['gain_ci_low']:.4f}, "
                                  f"{r['gain_ci_high']:.4f}] (n={r['seeds']})"}
              for r in curve]
    figures = []
    if "gat" in keep:
        figures += _plot_neighbourhood(ctx, keep["gat"], keep["data"])
    figures += _plot_regime(ctx, curve)
    sign = {True: "above", False: "not above"}
    notes = (
        f"{len(seeds)} seeds; each seed draws its own graph ({n} nodes) and split, every model "
        "is trained on it with the same budget and early stopping (validation loss); gains are "
        "paired by seed. Const-GAT is the GAT stack with the score replaced by a constant "
        "(uniform weights over each node's neighbours and itself); mean aggregation is the "
        "single-head form of the same model; GraphSAGE-mean and GCN get the GAT's hidden width. "
        f"Generator parameters fixed in advance: {PPI_GENERATOR}. "
        f"GAT - Const-GAT = {gains['const_gat']}, GAT - mean = {gains['mean']}, "
        f"GAT - GraphSAGE = {gains['sage']}, GAT - GCN = {gains['gcn']}. "
        "Regime curve (GAT - Const-GAT against the share of cross-module, i.e. misleading, "
        "neighbours; only within_module varied): "
        + "; ".join(f"{r['cross_share_measured']:.2f}: {r['gain']:+.4f} "
                    f"[{r['gain_ci_low']:+.4f}, {r['gain_ci_high']:+.4f}] "
                    f"({sign[r['gain_ci_low'] > 0]} 0)" for r in curve)
        + ". Deciding: GAT beats Const-GAT and mean aggregation (both paired gains' CIs above "
        "0). In the paper (real PPI, inductive) GAT 0.973 vs Const-GAT 0.934.")
    return Result(
        metrics=metrics, decisions=decisions, seeds=len(seeds), table=table, figures=figures,
        params={"nodes": n, "generator": PPI_GENERATOR, "score": PPI_SCORE, **MODEL_SIZES,
                "budget": _budget(ctx), "seeds": seeds, "models": list(PPI_MODELS),
                "cross_shares": list(CROSS_SHARES_QUICK if ctx.quick else CROSS_SHARES_FULL),
                "quick": ctx.quick},
        notes=notes,
    )


def ppi_summary(per_seed: list[dict[str, float]]):
    """Per-seed micro-F1 ``[{model: f1}]`` -> ``(f1 arrays, paired gains of GAT over each
    baseline, flat metrics, deciding Decisions)``: the claim holds when GAT's paired gain over
    Const-GAT and over mean aggregation both have their CI above 0."""
    f1 = stats.stack_metrics(per_seed)
    gains = {k: stats.paired_diff_ci(f1["gat"], f1[k]) for k in PPI_MODELS[1:]}
    short = {"const_gat": "const", "mean": "mean", "sage": "sage", "gcn": "gcn"}
    metrics: dict[str, float] = {}
    for k in PPI_MODELS:
        metrics.update(stats.mean_ci(f1[k]).metrics(f"micro_f1_{k}"))
    for k, ci in gains.items():
        metrics.update(ci.metrics(f"gain_gat_over_{short[k]}"))
    decisions = [
        gains["const_gat"].decide("gain_gat_over_const", 0.0, ">",
                                  "GAT minus Const-GAT (uniform weights), paired by seed"),
        gains["mean"].decide("gain_gat_over_mean", 0.0, ">",
                             "GAT minus mean aggregation, paired by seed"),
    ]
    return f1, gains, metrics, decisions


def _regime_curve(ctx: RunContext, seeds: list[int], main: list[dict]) -> list[dict]:
    """GAT - Const-GAT against the nominal cross-module share ``1 - within_module``; the main
    setting's point reuses the main runs; others use 3 seeds in quick mode."""
    shares = CROSS_SHARES_QUICK if ctx.quick else CROSS_SHARES_FULL
    base = 1.0 - PPI_GENERATOR["within_module"]
    rows = []
    for share in ctx.progress(shares, desc="ppi regime", total=len(shares)):
        params = dict(PPI_GENERATOR, within_module=1.0 - share)
        curve_seeds = seeds if math.isclose(share, base) or not ctx.quick else seeds[:3]
        gat, const, measured = [], [], []
        for i, seed in enumerate(curve_seeds):
            data, module = generate_ppi_like(num_nodes=_nodes(ctx), seed=seed,
                                             return_modules=True, **params)
            measured.append(cross_module_share(data.edge_index, module))
            if math.isclose(share, base):
                gat.append(main[i]["gat"])
                const.append(main[i]["const_gat"])
                continue
            graph = build_graph_index(data.edge_index, data.num_nodes)
            for kind, out in (("gat", gat), ("const_gat", const)):
                model = _train(kind, data, graph, ctx, seed)
                out.append(evaluate(model, data, data.test_mask, graph))
        ci = stats.paired_diff_ci(gat, const)
        rows.append({"cross_share_nominal": share,
                     "cross_share_measured": float(np.mean(measured)),
                     "gat": float(np.mean(gat)), "const_gat": float(np.mean(const)),
                     "gain": ci.value, "gain_ci_low": ci.low, "gain_ci_high": ci.high,
                     "seeds": len(curve_seeds)})
    return rows


def _plot_regime(ctx: RunContext, curve: list[dict]) -> list[str]:
    plt = ctx.pyplot()
    if plt is None or not curve:
        return []
    x = [r["cross_share_measured"] for r in curve]
    y = [r["gain"] for r in curve]
    lo = [r["gain"] - r["gain_ci_low"] for r in curve]
    hi = [r["gain_ci_high"] - r["gain"] for r in curve]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("share of cross-module (misleading) neighbours")
    ax.set_ylabel("micro-F1: GAT - Const-GAT (95% CI)")
    ax.set_title("Where attention over neighbours helps")
    return [ctx.save_figure(fig, "ppi_gain_vs_cross_share.png", dpi=120)]


def _plot_neighbourhood(ctx: RunContext, model: GAT, data: GraphData) -> list[str]:
    """Bar chart of layer-1 attention (head-averaged) over one mid-degree protein's neighbours."""
    plt = ctx.pyplot()
    if plt is None:
        return []
    model.eval()
    weights = model.attention_weights(data.x, data.edge_index, layer=0).mean(1)  # (E,)
    deg = data.degree()
    target = int(torch.argmin((deg.float() - 12).abs() + 1000 * data.test_mask.logical_not()))
    sel = data.edge_index[1] == target
    nbrs = data.edge_index[0][sel]
    w = weights[sel]
    shared = (data.y[nbrs] * data.y[target]).sum(1)  # functions shared with the target
    order = torch.argsort(w, descending=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colors = ["tab:green" if s > 0 else "tab:grey" for s in shared[order].tolist()]
    heights = w[order].tolist() + [1.0 - float(w.sum())]  # the rest is the node's self loop
    ax.bar(range(len(heights)), heights, color=colors + ["tab:blue"])
    ax.set_xticks(range(len(heights)))
    ax.set_xticklabels([f"{int(nbrs[i])}\n(d={int(deg[nbrs[i]])})" for i in order] + ["self"],
                       fontsize=6)
    ax.set_ylabel("attention weight (layer 1, mean of heads)")
    ax.set_title(f"Protein {target}: neighbours (d = degree); green = shares a function")
    return [ctx.save_figure(fig, "ppi_attention_neighbourhood.png", dpi=120)]


# --------------------------------------------------------------------------------- hubs

#: Test-time softmax temperature of the temperature variants: fixed in advance (the value the
#: earlier, training-time version used). Applied to a trained model, training cannot undo it.
HUB_TEMPERATURE = 2.0
#: variant -> (trained model, test-time temperature)
HUB_VARIANTS = {
    "plain": ("gat", None),
    "temperature": ("gat", HUB_TEMPERATURE),
    "degree_norm": ("gat_degree", None),
    "both": ("gat_degree", HUB_TEMPERATURE),
    "mean": ("mean", None),
    "gcn": ("gcn", None),
}
MITIGATIONS = ("temperature", "degree_norm", "both")
ATTENTION_VARIANTS = ("plain", "temperature", "degree_norm", "both")
HUB_SHARE = 0.01  # the top 1% of nodes by degree are the hubs


@contextlib.contextmanager
def temperature_at_test(model: GAT, temperature: float | None) -> Iterator[None]:
    """Every layer of ``model`` with softmax temperature ``temperature`` inside the block (the
    trained float temperatures restored afterwards); ``None`` changes nothing."""
    if temperature is None:
        yield
        return
    old = [layer.temperature for layer in model.layers]
    if any(isinstance(t, torch.Tensor) for t in old):
        raise ValueError("temperature_at_test needs layers with float temperatures")
    for layer in model.layers:
        layer._set_temperature(float(temperature))
    try:
        yield
    finally:
        for layer, t in zip(model.layers, old):
            layer._set_temperature(t)


def _hub_mass(model: torch.nn.Module, kind: str, data: GraphData, x: torch.Tensor,
              is_hub: torch.Tensor, graph: GraphIndex) -> float:
    """Mean over non-hub nodes with a hub neighbour of the first layer's weight on hubs
    (attention: head-averaged softmax weights; mean aggregation: uniform over the neighbours
    and the node itself; GCN: the normalised adjacency's share)."""
    ei = data.edge_index
    target = ei[1]
    if kind.startswith("gat"):
        model.eval()
        w = model.attention_weights(x, ei, layer=0).mean(1).double()  # (E,), input edge order
        total = None
    else:
        src, dst = graph.src, graph.dst
        m = graph.multiplicity.double()
        deg = torch.zeros(data.num_nodes, dtype=torch.float64).index_add(0, dst, m)
        pair_w = m / deg[dst] if kind == "mean" else m * (deg[dst] * deg[src]).rsqrt()
        w = pair_w[graph.edge_pair]
        total = torch.zeros(data.num_nodes, dtype=torch.float64).index_add(0, dst, pair_w)
    on_hubs = torch.zeros(data.num_nodes, dtype=torch.float64).index_add(
        0, target, w * is_hub[ei[0]].double())
    if total is not None:
        on_hubs = on_hubs / total
    has_hub = torch.zeros(data.num_nodes, dtype=torch.bool)
    has_hub[target[is_hub[ei[0]]]] = True
    sel = has_hub & ~is_hub
    return float(on_hubs[sel].mean()) if bool(sel.any()) else math.nan


def run_hubs(ctx: RunContext) -> Result:
    seeds = ctx.seed_list(quick=5, full=5)
    n = _nodes(ctx)
    levels = [0.0, 2.0, 4.0, 8.0] if ctx.quick else [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]

    def one_seed(seed: int) -> dict[str, float]:
        data = generate_ppi_like(num_nodes=n, seed=seed + 1000, **PPI_GENERATOR)
        graph = build_graph_index(data.edge_index, data.num_nodes)
        deg = data.degree()
        n_hubs = max(1, int(round(HUB_SHARE * data.num_nodes)))
        hubs = torch.topk(deg, n_hubs).indices
        is_hub = torch.zeros(data.num_nodes, dtype=torch.bool)
        is_hub[hubs] = True
        gen = torch.Generator().manual_seed(seed + 7)
        noise = torch.randn(n_hubs, data.x.shape[1], generator=gen) * data.x.std(0)
        models = {"gat": _train("gat", data, graph, ctx, seed),
                  "gat_degree": _train("gat", data, graph, ctx, seed, degree_norm="log"),
                  "mean": _train("mean", data, graph, ctx, seed),
                  "gcn": _train("gcn", data, graph, ctx, seed)}
        out: dict[str, float] = {"hub_min_degree": float(deg[hubs].min())}
        for name, (kind, temp) in HUB_VARIANTS.items():
            model = models[kind]
            with temperature_at_test(model, temp):
                for s in levels:
                    x = data.x.clone()
                    x[hubs] = x[hubs] + s * noise
                    out[f"{name}@{s:g}"] = evaluate(model, data, data.test_mask, graph, x=x)
                    if s in (levels[0], levels[-1]):
                        out[f"mass_{name}@{s:g}"] = _hub_mass(model, kind, data, x, is_hub,
                                                              graph)
        return out

    with stats.single_thread():
        per_seed = stats.over_seeds(one_seed, seeds, progress=ctx.progress, desc="hubs")
    m, clean, rel, reductions, decisions = hubs_summary(per_seed, levels)
    top = f"{levels[-1]:g}"
    metrics: dict[str, float] = {}
    for v in HUB_VARIANTS:
        metrics[f"f1_clean_{v}"] = float(np.mean(clean[v]))
        metrics[f"f1_drop_{v}"] = float(np.mean(clean[v] - m[f"{v}@{top}"]))
        metrics.update(stats.mean_ci(rel[v][top]).metrics(f"rel_drop_{v}"))
        metrics.update(stats.mean_ci(m[f"mass_{v}@0"]).metrics(f"hub_mass_{v}_clean"))
        metrics.update(stats.mean_ci(m[f"mass_{v}@{top}"]).metrics(f"hub_mass_{v}_noisy"))
    vs_avg = {v: stats.paired_diff_ci(rel["plain"][top], rel[v][top]) for v in ("mean", "gcn")}
    metrics.update(vs_avg["mean"].metrics("rel_drop_gat_minus_mean"))
    metrics.update(vs_avg["gcn"].metrics("rel_drop_gat_minus_gcn"))
    curves = {v: [stats.mean_ci(rel[v][f"{s:g}"]) for s in levels[1:]] for v in HUB_VARIANTS}
    table = [{"variant": v, "clean_f1": round(float(np.mean(clean[v])), 4),
              **{f"rel_drop@{s:g}": str(ci) for s, ci in zip(levels[1:], curves[v])},
              "hub_mass_clean": round(float(np.nanmean(m[f"mass_{v}@0"])), 4),
              f"hub_mass@{top}": round(float(np.nanmean(m[f"mass_{v}@{top}"])), 4)}
             for v in HUB_VARIANTS]
    less_robust = vs_avg["mean"].low > 0
    verdict_avg = ("attention (plain GAT) is LESS robust than averaging: its relative drop "
                   f"exceeds mean aggregation's by {vs_avg['mean']}" if less_robust else
                   "plain GAT is not shown less robust than mean aggregation "
                   f"(drop difference {vs_avg['mean']})")
    notes = (
        f"{len(seeds)} seeds (own graph of {n} nodes and noise draw each); hubs = top "
        f"{HUB_SHARE:.0%} of nodes by degree; at test time their features get sigma x N(0, "
        "feature std) added; relative drop = (clean F1 - noisy F1) / clean F1 of the same "
        f"model. Temperature T = {HUB_TEMPERATURE:g} is applied at test time to the trained "
        "models (plain -> 'temperature', degree-normalised -> 'both'), so training cannot undo "
        "it; 'degree_norm' is a GAT trained with degree_norm='log' (each neighbour's weight "
        "divided by its degree inside the softmax). Mean aggregation and GCN are references. "
        + "; ".join(f"{v}: drop reduction vs plain {reductions[v]}" for v in MITIGATIONS)
        + f". {verdict_avg}; plain GAT minus GCN: {vs_avg['gcn']}. Hub attention mass "
        "(non-hub nodes next to a hub, layer 1) clean -> noisy: "
        + ", ".join(f"{v} {np.nanmean(m[f'mass_{v}@0']):.3f} -> "
                    f"{np.nanmean(m[f'mass_{v}@{top}']):.3f}" for v in HUB_VARIANTS)
        + ". Held if every mitigation's paired reduction of the drop has its CI above 0.")
    return Result(
        metrics=metrics, decisions=decisions, seeds=len(seeds), table=table,
        figures=_plot_hubs(ctx, levels[1:], curves),
        params={"nodes": n, "hub_share": HUB_SHARE, "noise_levels": levels,
                "temperature": HUB_TEMPERATURE, "generator": PPI_GENERATOR,
                "variants": {k: f"{a}, T={t}" for k, (a, t) in HUB_VARIANTS.items()},
                "score": PPI_SCORE, "budget": _budget(ctx), "seeds": seeds,
                "hub_min_degree": float(np.min(m["hub_min_degree"])), "quick": ctx.quick},
        notes=notes,
    )


def hubs_summary(per_seed: list[dict[str, float]], levels: list[float]):
    """Per-seed ``{"variant@level": f1}`` -> ``(stacked, clean F1, relative drops
    {variant: {level: array}}, paired drop reductions of each mitigation vs plain GAT at the
    largest level, Decisions)``. A reduction > 0 means the mitigation loses less."""
    m = stats.stack_metrics(per_seed)
    top = f"{levels[-1]:g}"
    clean = {v: m[f"{v}@0"] for v in HUB_VARIANTS}
    rel = {v: {f"{s:g}": (clean[v] - m[f"{v}@{s:g}"]) / clean[v] for s in levels[1:]}
           for v in HUB_VARIANTS}
    reductions = {v: stats.paired_diff_ci(rel["plain"][top], rel[v][top]) for v in MITIGATIONS}
    decisions = [reductions[v].decide(
        f"drop_reduction_{v}", 0.0, ">",
        f"relative micro-F1 drop at noise {top}: plain GAT minus {v}, paired by seed")
        for v in MITIGATIONS]
    return m, clean, rel, reductions, decisions


def _plot_hubs(ctx: RunContext, levels, curves) -> list[str]:
    plt = ctx.pyplot()
    if plt is None:
        return []
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, cis in curves.items():
        y = [c.value for c in cis]
        line, = ax.plot(levels, y, marker="o", label=name,
                        ls="--" if name in ("mean", "gcn") else "-")
        ax.fill_between(levels, [c.low for c in cis], [c.high for c in cis],
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("noise on hub features (x feature std)")
    ax.set_ylabel("relative micro-F1 drop (95% CI)")
    ax.set_title(f"Noisy hubs (top {HUB_SHARE:.0%} by degree)")
    ax.legend(fontsize=7)
    return [ctx.save_figure(fig, "hubs_rel_drop_vs_noise.png", dpi=120)]


# --------------------------------------------------------------------------------- planetoid

PLANETOID_SCORE = "additive"  # the GAT paper's score
#: The GAT paper's mean test accuracies (Velickovic et al. 2018, Table 2); the claim is that
#: the engine's GAT comes within one point of them.
PAPER_ACCURACY = {"cora": 0.830, "citeseer": 0.725, "pubmed": 0.790}
TOLERANCE = 0.01


def _planetoid_setup(name: str, quick: bool) -> dict:
    """The paper's hyper-parameters (PubMed: 8 output heads, lr 0.01, weight decay 0.001);
    quick mode caps training at 200 epochs with patience 50 (the paper: 100 patience)."""
    setup = dict(hidden=8, heads=8, out_heads=1, dropout=0.6, lr=0.005, weight_decay=5e-4)
    if name == "pubmed":
        setup.update(out_heads=8, lr=0.01, weight_decay=1e-3)
    if quick:
        setup.update(epochs=200, patience=50)
    else:
        setup.update(epochs=1000, patience=100)
    return setup


def _datasets(ctx: RunContext, data_dir: Path) -> list[str]:
    """``--dataset`` when given, else every Planetoid set whose files are in ``data_dir``."""
    chosen = ctx.options.get("dataset")
    if chosen:
        return [chosen.lower()]
    found = [n for n in PLANETOID_NAMES if (data_dir / f"ind.{n}.graph").is_file()]
    if not found:
        raise FileNotFoundError(f"{data_dir}: no Planetoid files ("
                                + ", ".join(f"ind.{n}.*" for n in PLANETOID_NAMES) + ")")
    return found


def run_planetoid(ctx: RunContext) -> Result:
    data_dir = ctx.options.get("data_dir")
    if not data_dir:
        raise ValueError("planetoid needs --data-dir DIR (a folder of ind.NAME.* files)")
    data_dir = Path(data_dir)
    names = _datasets(ctx, data_dir)
    seeds = ctx.seed_list(quick=3, full=10)
    metrics: dict[str, float] = {}
    decisions, table, params = [], [], {}
    with stats.single_thread():
        for name in names:
            accs = _planetoid_runs(ctx, data_dir, name, seeds, params)
            ci = stats.mean_ci(accs)
            target = PAPER_ACCURACY[name] - TOLERANCE
            metrics.update(ci.metrics(f"test_acc_{name}"))
            metrics[f"test_acc_std_{name}"] = statistics.pstdev(accs)
            if name == names[0]:  # the old names, for the first (by default Cora)
                metrics["test_acc_mean"] = ci.value
                metrics["test_acc_std"] = statistics.pstdev(accs)
            decisions.append(ci.decide(
                f"test_acc_{name}", target, ">",
                f"mean test accuracy over {len(seeds)} seeds vs the paper's "
                f"{PAPER_ACCURACY[name]:.3f} - {TOLERANCE}"))
            table += [{"dataset": name, "seed": s, "test_acc": round(a, 4)}
                      for s, a in zip(seeds, accs)]
    return Result(
        metrics=metrics, decisions=decisions, seeds=len(seeds), table=table,
        params={"datasets": names, "seeds": seeds, "score": PLANETOID_SCORE, "layers": 2,
                "split": "standard (Planetoid)", **params, "quick": ctx.quick},
        notes="GAT paper setup (2 layers, 8 heads x 8 features, dropout 0.6, row-normalised "
              "features; PubMed 8 output heads, lr 0.01, weight decay 0.001), early stopping on "
              "validation accuracy (ties: lower validation loss). Held when the mean test "
              f"accuracy's CI lies above the paper's number minus {TOLERANCE} for every data "
              "set run (Cora 0.82, CiteSeer 0.715, PubMed 0.78). "
              + ("Quick mode: 3 seeds, at most 200 epochs with patience 50 (the paper trains "
                 "up to 100 epochs past the best); full mode: 10 seeds, 1000 epochs, patience "
                 "100." if ctx.quick else "Full mode: 10 seeds, 1000 epochs, patience 100.")
              + f" Data sets run: {', '.join(names)} (others run when their ind.NAME.* files "
              "are in --data-dir or named by --dataset).",
    )


def _planetoid_runs(ctx: RunContext, data_dir: Path, name: str, seeds: list[int],
                    params: dict) -> list[float]:
    data = load_planetoid(data_dir, name)
    # row-normalized features, as in the GAT paper
    data.x = data.x / data.x.sum(1, keepdim=True).clamp(min=1e-12)
    graph = build_graph_index(data.edge_index, data.num_nodes)
    setup = _planetoid_setup(name, ctx.quick)
    params[name] = setup
    num_classes = int(data.y.max()) + 1
    accs = []
    for seed in ctx.progress(seeds, desc=f"planetoid {name}", total=len(seeds)):
        stats.seed_everything(seed)
        model = GAT(data.x.shape[1], setup["hidden"], num_classes, heads=setup["heads"],
                    layers=2, out_heads=setup["out_heads"], dropout=setup["dropout"],
                    score=PLANETOID_SCORE)
        fit(model, data, epochs=setup["epochs"], lr=setup["lr"],
            weight_decay=setup["weight_decay"], patience=setup["patience"], graph=graph)
        accs.append(evaluate(model, data, data.test_mask, graph))
    return accs


EXPERIMENTS = [
    Experiment(
        name="ppi",
        claim="Graph attention predicts protein functions better than the same network with "
              "uniform weights over neighbours (Const-GAT) and than mean aggregation "
              "(micro-F1, multi-label, synthetic PPI-like graphs, paired over 5 seeds).",
        run=run_ppi,
    ),
    Experiment(
        name="hubs",
        claim="A softmax temperature (at test time), degree normalization, and both make graph "
              "attention lose less micro-F1 (relative) than plain GAT when hub proteins' "
              "features are noisy.",
        run=run_hubs,
    ),
    Experiment(
        name="planetoid",
        claim="The GAT paper's setup on the engine comes within one point of the paper's mean "
              "test accuracy (Cora >= 82%; CiteSeer, PubMed when their files are given).",
        run=run_planetoid,
        options=(Option("--data-dir", type=existing_dir, required=True,
                        help="folder with ind.NAME.* files"),
                 Option("--dataset", type=one_of(*PLANETOID_NAMES, lower=True), default=None,
                        help="cora, citeseer or pubmed (default: every one whose files are in "
                             "--data-dir)")),
    ),
]
