"""Link prediction on food webs: held-out splits, ROC-AUC / PR-AUC (numpy), the niche-interval
and trophic-only baselines, and training of :class:`TrophicAttention` on the training links.

Leakage rule: everything a predictor sees (diets, trophic levels feeding the bias, heuristic
niche axes) is computed from the training flows of the split only; the full web is used only
for the evaluation labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..distributed.data_parallel import rescale_mean, shard_slice, wrap_ddp
from .model import TrophicAttention
from .trophic import trophic_levels


@dataclass(frozen=True)
class LinkSplit:
    """One split of a web's links (self-loops excluded).

    Attributes:
        train_flows: ``(S, S)`` flows with the held-out links zeroed.
        heldout: ``(K, 2)`` int ``(prey, predator)`` pairs hidden from training.
        candidates: ``(S, S)`` bool, pairs to rank at evaluation: held-out links and non-links
            (not training links, not the diagonal).
        labels: ``(S, S)`` bool, True on held-out links.
    """

    train_flows: np.ndarray
    heldout: np.ndarray
    candidates: np.ndarray
    labels: np.ndarray


def split_links(
    flows: np.ndarray, heldout_fraction: float = 0.2, num_splits: int = 5, seed: int = 0
) -> list[LinkSplit]:
    """``num_splits`` independent random splits hiding ``heldout_fraction`` of the links.

    ``flows``: ``(S, S)``, ``flows[prey, predator] >= 0``. Self-loops (cannibalism) are kept in
    the training flows but never held out or evaluated.
    """
    flows = np.asarray(flows, dtype=np.float64)
    if flows.ndim != 2 or flows.shape[0] != flows.shape[1]:
        raise ValueError(f"flows must be (S, S), got shape {flows.shape}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    s = flows.shape[0]
    offdiag = ~np.eye(s, dtype=bool)
    links = np.argwhere((flows > 0) & offdiag)
    k = int(round(heldout_fraction * len(links)))
    if k < 1 or k >= len(links):
        raise ValueError(f"{len(links)} links are too few to hide {heldout_fraction:.0%} of them")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_splits):
        hidden = links[rng.permutation(len(links))[:k]]
        train = flows.copy()
        train[hidden[:, 0], hidden[:, 1]] = 0.0
        labels = np.zeros((s, s), dtype=bool)
        labels[hidden[:, 0], hidden[:, 1]] = True
        candidates = offdiag & ~(train > 0)
        out.append(LinkSplit(train_flows=train, heldout=hidden, candidates=candidates,
                             labels=labels))
    return out


# ----------------------------------------------------------------------------- metrics


def _check_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have one entry each, got {scores.shape} "
                         f"and {labels.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    if labels.all() or not labels.any():
        raise ValueError("labels must contain both positives and negatives")
    return scores, labels


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    scores, labels = _check_scores(scores, labels)
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    # Average ranks over runs of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    avg = (starts + ends + 1) / 2.0  # 1-based mean rank of each run
    ranks[order] = np.repeat(avg, ends - starts)
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """PR-AUC as average precision, ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds
    (tied scores enter together, as scikit-learn's ``average_precision_score``)."""
    scores, labels = _check_scores(scores, labels)
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    y = labels[order]
    last_of_run = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_run]
    seen = (np.arange(1, len(s) + 1))[last_of_run]
    precision = tp / seen
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# ---------------------------------------------------------------------------- baselines


def niche_interval_scores(train_flows: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """The niche-model heuristic: ``(S, S)`` scores ``[prey, predator]``.

    The niche axis is the training trophic level; as in the niche model a predator eats a
    contiguous interval of it, estimated as ``[min, max]`` of its training prey's levels. A
    candidate prey scores minus its distance to that interval (0 inside); ties break by the
    prey's number of training predators. A predator without training prey expects prey one
    level below itself.
    """
    train = np.asarray(train_flows) > 0
    s = train.shape[0]
    levels = np.asarray(levels, dtype=np.float64)
    scores = np.empty((s, s))
    popularity = train.sum(axis=1) / max(s, 1)  # prey's number of predators, in [0, 1]
    for j in range(s):
        prey = np.flatnonzero(train[:, j] & (np.arange(s) != j))
        if prey.size:
            lo, hi = levels[prey].min(), levels[prey].max()
            gap = np.maximum(0.0, np.maximum(lo - levels, levels - hi))
        else:
            gap = np.abs(levels[j] - 1.0 - levels)
        scores[:, j] = -gap + 1e-3 * popularity
    return scores


def trophic_only_scores(train_flows: np.ndarray, levels: np.ndarray, bins: int = 16) -> np.ndarray:
    """Link rate among training pairs as a function of the trophic-level difference only:
    ``(S, S)`` scores ``[prey, predator]`` (binned, Laplace-smoothed)."""
    train = np.asarray(train_flows) > 0
    s = train.shape[0]
    levels = np.asarray(levels, dtype=np.float64)
    diff = levels[None, :] - levels[:, None]  # predator minus prey
    offdiag = ~np.eye(s, dtype=bool)
    edges = np.linspace(diff[offdiag].min(), diff[offdiag].max() + 1e-9, bins + 1)
    which = np.clip(np.digitize(diff, edges) - 1, 0, bins - 1)
    pos = np.bincount(which[offdiag & train], minlength=bins)
    tot = np.bincount(which[offdiag], minlength=bins)
    rate = (pos + 1.0) / (tot + 2.0)
    return rate[which]


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class FitConfig:
    dim: int = 8
    steps: int = 300
    lr: float = 0.05
    weight_decay: float = 1e-3
    seed: int = 0


def target_diets(train_flows: np.ndarray, weighted: bool) -> np.ndarray:
    """``(S, S + 1)`` rows = predators, each its training diet as a distribution; species
    without training prey put their mass on the last ("no prey") column. Self-loops are dropped
    (the model masks the diagonal)."""
    w = np.asarray(train_flows, dtype=np.float64).T.copy()
    np.fill_diagonal(w, 0.0)
    if not weighted:
        w = (w > 0).astype(np.float64)
    w = np.concatenate([w, (w.sum(axis=1, keepdims=True) == 0).astype(np.float64)], axis=1)
    return w / w.sum(axis=1, keepdims=True)


def fit_trophic_attention(
    train_flows: np.ndarray,
    levels: np.ndarray | None,
    bias: str | None,
    config: FitConfig = FitConfig(),
    weighted: bool = True,
) -> TrophicAttention:
    """Train :class:`TrophicAttention` by cross-entropy toward the training diets.

    ``levels`` (``(S,)``, from the training flows) feed the bias; ignored for ``bias=None``.
    Under ``torchrun`` each rank fits a ``DistributedDataParallel`` copy on its share of the
    predators (rows of the diet); the averaged gradient is the full one.
    """
    target = torch.as_tensor(target_diets(train_flows, weighted))
    s = target.shape[0]
    if bool((target[:, -1] == 1).all()):
        raise ValueError("no species has a training prey; nothing to train on")
    torch.manual_seed(config.seed)
    model = TrophicAttention(s, config.dim, bias=bias).double()
    tl = None if levels is None else torch.as_tensor(levels, dtype=torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    net = wrap_ddp(model)  # the model itself unless running under torchrun
    rows = shard_slice(s)  # this rank's predators (all of them in one process)
    n_rows = rows.stop - rows.start
    for _ in range(config.steps):
        opt.zero_grad()
        diet = net(tl)
        loss = -(target[rows] * torch.log(diet[rows].clamp_min(1e-30))).sum() / n_rows
        loss = rescale_mean(loss, n_rows)
        loss.backward()
        opt.step()
    return model


def attention_scores(model: TrophicAttention, levels: np.ndarray | None) -> np.ndarray:
    """``(S, S)`` link scores ``[prey, predator]``: the predicted diet weights."""
    with torch.no_grad():
        tl = None if levels is None else torch.as_tensor(levels, dtype=torch.float64)
        return model(tl)[:, :-1].numpy().T.copy()


def score_split(
    split: LinkSplit, config: FitConfig = FitConfig(), weighted: bool = True
) -> dict[str, np.ndarray]:
    """Scores ``[prey, predator]`` of every predictor on one split, from its training flows only.

    Returns ``{"bias", "nobias", "heuristic", "trophic_only"}`` score matrices plus ``"levels"``
    (the training trophic levels) and the learned bias curve ``"bias_knots"``, ``"bias_values"``.
    """
    train = split.train_flows
    levels = trophic_levels(train, weighted=weighted)
    with_bias = fit_trophic_attention(train, levels, "trophic", config, weighted)
    no_bias = fit_trophic_attention(train, None, None, config, weighted)
    return {
        "bias": attention_scores(with_bias, levels),
        "nobias": attention_scores(no_bias, None),
        "heuristic": niche_interval_scores(train, levels),
        "trophic_only": trophic_only_scores(train, levels),
        "levels": levels,
        "bias_knots": with_bias.trophic_bias.knots.numpy(),
        "bias_values": with_bias.trophic_bias.values.detach().numpy().copy(),
    }


def evaluate_scores(split: LinkSplit, scores: np.ndarray) -> tuple[float, float]:
    """``(ROC-AUC, PR-AUC)`` of ``scores`` on the split's held-out links vs non-links."""
    mask = split.candidates
    return roc_auc(scores[mask], split.labels[mask]), average_precision(
        scores[mask], split.labels[mask])


def within_predator_auc(split: LinkSplit, scores: np.ndarray) -> float:
    """Mean over predators of the ROC-AUC ranking that predator's candidate prey (held-out
    links vs non-links in its column): how well each predicted diet is ordered, free of the
    per-predator normalisation that a global ranking mixes in. NaN if no predator qualifies."""
    aucs = []
    for j in range(scores.shape[1]):
        mask = split.candidates[:, j]
        labels = split.labels[mask, j]
        if labels.any() and not labels.all():
            aucs.append(roc_auc(scores[mask, j], labels))
    return float(np.mean(aucs)) if aucs else float("nan")
