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

from ..checks import check_positive_int
from ..distributed.data_parallel import rescale_mean, shard_slice, wrap_ddp
from .model import BatchedTrophicAttention, TrophicAttention
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
        unknown_diet: ``(S,)`` bool or None: predators whose diet is unrecorded (cold start).
            Training leaves their rows out of the loss: "no recorded prey" is not "eats
            nothing", which is what a basal species' target says.
    """

    train_flows: np.ndarray
    heldout: np.ndarray
    candidates: np.ndarray
    labels: np.ndarray
    unknown_diet: np.ndarray | None = None


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


def cold_start_split(
    flows: np.ndarray, predator_fraction: float = 0.2, num_splits: int = 5, seed: int = 0
) -> list[LinkSplit]:
    """``num_splits`` cold-start splits: each hides *every* link of a random
    ``predator_fraction`` of the predators (species with at least one prey other than
    themselves), as for species whose diet nobody has recorded yet.

    A chosen predator's self-loop (cannibalism) is hidden from training too, but, like every
    self-loop, never evaluated. Evaluation ranks, within the chosen predators' columns only,
    their hidden prey against the species they do not eat: the question is how well an
    unrecorded diet is guessed, not how a cold predator compares with well-known ones. Only
    the chosen predators' diets are hidden; their links as prey stay (they are in
    ``unknown_diet``, so training does not read "eats nothing" into them).
    """
    flows = np.asarray(flows, dtype=np.float64)
    if flows.ndim != 2 or flows.shape[0] != flows.shape[1]:
        raise ValueError(f"flows must be (S, S), got shape {flows.shape}")
    if not 0.0 < predator_fraction < 1.0:
        raise ValueError(f"predator_fraction must be in (0, 1), got {predator_fraction}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    s = flows.shape[0]
    offdiag = ~np.eye(s, dtype=bool)
    links = (flows > 0) & offdiag
    predators = np.flatnonzero(links.any(axis=0))
    k = max(1, int(round(predator_fraction * predators.size)))
    if predators.size < 2 or k >= predators.size:
        raise ValueError(f"{predators.size} predator(s) are too few for a cold-start split "
                         f"hiding {predator_fraction:.0%} of them")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_splits):
        cold = np.zeros(s, dtype=bool)
        cold[rng.permutation(predators)[:k]] = True
        train = flows.copy()
        train[:, cold] = 0.0
        labels = links & cold[None, :]
        candidates = offdiag & cold[None, :]
        out.append(LinkSplit(train_flows=train, heldout=np.argwhere(labels),
                             candidates=candidates, labels=labels, unknown_diet=cold))
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
    prey's number of training predators. A predator without training prey expects prey at the
    mean predator-minus-prey gap of the training links (about one trophic level for trophic
    levels; any axis works, e.g. niche values in [0, 1]).
    """
    train = np.asarray(train_flows) > 0
    s = train.shape[0]
    levels = np.asarray(levels, dtype=np.float64)
    scores = np.empty((s, s))
    popularity = train.sum(axis=1) / max(s, 1)  # prey's number of predators, in [0, 1]
    offdiag = train & ~np.eye(s, dtype=bool)
    prey_idx, pred_idx = np.nonzero(offdiag)
    step = float(np.mean(levels[pred_idx] - levels[prey_idx])) if prey_idx.size else 1.0
    for j in range(s):
        prey = np.flatnonzero(offdiag[:, j])
        if prey.size:
            lo, hi = levels[prey].min(), levels[prey].max()
            gap = np.maximum(0.0, np.maximum(lo - levels, levels - hi))
        else:
            gap = np.abs(levels[j] - step - levels)
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


def low_rank_scores(train_flows: np.ndarray, rank: int = 4) -> np.ndarray:
    """Structural baseline: the best rank-``rank`` approximation (truncated SVD, i.e. matrix
    factorisation) of the binary training adjacency, ``(S, S)`` scores ``[prey, predator]``.
    It sees links only, no trait."""
    a = (np.asarray(train_flows) > 0).astype(np.float64)
    check_positive_int("rank", rank)
    u, sv, vt = np.linalg.svd(a)
    r = min(int(rank), sv.size)
    return (u[:, :r] * sv[:r]) @ vt[:r]


def preferential_attachment_scores(train_flows: np.ndarray) -> np.ndarray:
    """Structural baseline: ``(prey's training predators + 1) x (predator's training prey +
    1)``, ``(S, S)`` scores ``[prey, predator]`` (the +1 keeps cold predators' prey ordered by
    how often they are eaten)."""
    a = np.asarray(train_flows) > 0
    a = a & ~np.eye(a.shape[0], dtype=bool)
    return (a.sum(axis=1)[:, None] + 1.0) * (a.sum(axis=0)[None, :] + 1.0)


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


def fit_batched(
    train_flows: list[np.ndarray],
    traits: np.ndarray,
    use_bias: np.ndarray,
    config: FitConfig = FitConfig(),
    weighted: bool = False,
    seeds: list[int] | None = None,
    unknown_diet: np.ndarray | None = None,
) -> np.ndarray:
    """Train ``B`` independent :class:`TrophicAttention` models at once (one per split x
    prior x ablation; see :class:`BatchedTrophicAttention`) and return their ``(B, S, S)``
    link scores ``[prey, predator]`` (predicted diet weights).

    Args:
        train_flows: ``B`` ``(S, S)`` training flow matrices (each model its own split).
        traits: ``(B, S)`` the trait each model's bias reads (any values where the bias is off).
        use_bias: ``(B,)`` bool, False for the latent-traits-only ablation.
        config: as :func:`fit_trophic_attention`; ``seeds`` (default ``config.seed`` for all)
            seed each model's initialisation, so the model with and without bias on one split
            can start from the same embeddings.
        unknown_diet: ``(B, S)`` bool or None: predators left out of model ``b``'s loss
            (:attr:`LinkSplit.unknown_diet`).

    Model ``b`` is trained exactly as ``fit_trophic_attention(train_flows[b], traits[b], ...)``
    with ``config.seed = seeds[b]`` would be (same initialisation, same Adam steps; only
    floating-point summation order may differ).
    """
    b = len(train_flows)
    traits = np.asarray(traits, dtype=np.float64)
    use_bias = np.asarray(use_bias, dtype=bool).reshape(-1)
    if b == 0:
        raise ValueError("train_flows is empty")
    s = np.asarray(train_flows[0]).shape[0]
    if traits.shape != (b, s) or use_bias.shape != (b,):
        raise ValueError(f"traits must be (B, S) = ({b}, {s}) and use_bias (B,), got "
                         f"{traits.shape} and {use_bias.shape}")
    seeds = [config.seed] * b if seeds is None else list(seeds)
    if len(seeds) != b:
        raise ValueError(f"seeds must have one entry per model ({b}), got {len(seeds)}")
    target = torch.as_tensor(np.stack([target_diets(f, weighted) for f in train_flows]))
    if unknown_diet is not None:
        unknown_diet = np.asarray(unknown_diet, dtype=bool)
        if unknown_diet.shape != (b, s):
            raise ValueError(f"unknown_diet must be (B, S) = ({b}, {s}), "
                             f"got {unknown_diet.shape}")
        target = target * torch.as_tensor(~unknown_diet, dtype=target.dtype)[:, :, None]
    models = []
    for seed, bias in zip(seeds, use_bias, strict=True):
        torch.manual_seed(seed)
        models.append(TrophicAttention(s, config.dim, bias="trophic" if bias else None).double())
    model = BatchedTrophicAttention.from_models(models)
    tl = torch.as_tensor(np.where(use_bias[:, None], traits, 0.0))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(config.steps):
        opt.zero_grad()
        diet = model(tl)
        # Sum over models of each model's mean over predators: independent gradients.
        loss = -(target * torch.log(diet.clamp_min(1e-30))).sum() / s
        loss.backward()
        opt.step()
    with torch.no_grad():
        return model(tl)[:, :, :-1].transpose(1, 2).numpy().copy()


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
    """``(ROC-AUC, PR-AUC)`` of ``scores`` on the split's held-out links vs non-links
    (``(nan, nan)`` when the candidates hold only one class: nothing to rank)."""
    mask = split.candidates
    y = split.labels[mask]
    if y.all() or not y.any():
        return float("nan"), float("nan")
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
