"""Pruning attention heads: importance scores, physical removal, iterative pruning, save/load.

Layers are numbered in module order: layer ``i`` is the ``i``-th
:class:`attnkit.nn.SelfAttention` in ``model.modules()`` (block ``i`` of a
:class:`attnkit.lm.DecoderLM`). Heads are numbered ``0 .. num_heads - 1`` within the layer's
*current* heads (after a prune they are renumbered densely).

Grouped-/multi-query attention: query head ``h`` reads key/value head ``h // group`` with
``group = num_heads // num_kv_heads``. A key/value head cannot be removed without its queries
and the engine needs equal groups, so :func:`prune_heads` removes whole groups: a request must
name every query head of each group it touches, and is refused with a ``ValueError`` naming the
group otherwise. Pruning every head of a layer is refused (the block would have to become an
identity; remove it from the model yourself if that is what you want).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .flops import count
from .nn.attention import SelfAttention, attention_layers

__all__ = [
    "attention_layers",
    "head_gates",
    "lm_loss",
    "head_importance",
    "group_importance",
    "prune_heads",
    "PruneStep",
    "iterative_prune",
    "replay_prune",
    "random_prune_order",
    "gated_curve",
    "pruned_config",
    "save_pruned",
    "load_pruned",
    "measure_latency",
]

FORMAT = "attnkit.pruned/1"


@contextmanager
def head_gates(model: nn.Module, gates: Sequence[Tensor]):
    """Multiply each head's output by a gate while the context is active.

    ``gates[i]`` is a ``(num_heads_i,)`` tensor for layer ``i``; it is passed to that layer's
    ``forward(head_mask=...)`` (multiplied with any mask the caller passes) through a forward
    pre-hook, so it works whatever the model's own ``forward`` accepts and with layers of
    different head counts (a pruned model). Gates may require grad.
    """
    layers = attention_layers(model)
    if len(gates) != len(layers):
        raise ValueError(f"gates must hold one tensor per layer ({len(layers)}), got {len(gates)}")
    for i, (layer, g) in enumerate(zip(layers, gates)):
        if not isinstance(g, Tensor) or g.shape != (layer.num_heads,):
            shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"gates[{i}] must have shape ({layer.num_heads},), got {shape}")

    def make_hook(gate: Tensor):
        def hook(module, args, kwargs):
            existing = kwargs.get("head_mask")
            kwargs["head_mask"] = gate if existing is None else existing * gate
            return args, kwargs
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(g), with_kwargs=True)
               for layer, g in zip(layers, gates)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Next-token cross-entropy (nats) of a language model on ``batch (B, L + 1)`` token ids."""
    if not isinstance(batch, Tensor) or batch.dim() != 2 or batch.shape[1] < 2:
        got = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
        raise ValueError(f"batch must be (B, L + 1) token ids with L >= 1, got {got}")
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def head_importance(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], Tensor] = lm_loss,
    *,
    normalize: bool = True,
) -> list[Tensor]:
    """Head importance of Michel et al. (2019), "Are Sixteen Heads Really Better than One?".

    Every head's output is multiplied by a gate ``xi_h = 1``; the importance is the expected
    absolute gradient ``E_batches |d loss / d xi_h|`` (one forward and one backward pass per
    batch; model parameters get no gradients). With ``normalize`` each layer's scores are
    divided by their L2 norm, as in the paper, so layers compare on one scale.

    Args:
        model: any model holding :class:`attnkit.nn.SelfAttention` layers.
        batches: an iterable of batches (at least one).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; default :func:`lm_loss`.

    Returns:
        One ``(num_heads_i,)`` float tensor per layer (see :func:`attention_layers`).
    """
    layers = attention_layers(model)
    device = next(model.parameters()).device
    gates = [torch.ones(m.num_heads, device=device, requires_grad=True) for m in layers]
    totals = [torch.zeros(m.num_heads, dtype=torch.float64) for m in layers]
    n = 0
    was_training = model.training
    model.eval()  # no dropout: the score is about the model as it will be used
    try:
        with head_gates(model, gates):
            for batch in batches:
                loss = loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    raise ValueError("loss_fn must return a scalar tensor")
                grads = torch.autograd.grad(loss, gates, allow_unused=True)
                for t, g in zip(totals, grads):
                    if g is not None:
                        t += g.detach().abs().double().cpu()
                n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("batches is empty: need at least one batch to score heads")
    scores = [t / n for t in totals]
    if normalize:
        scores = [s / s.norm().clamp_min(1e-20) for s in scores]
    return [s.float() for s in scores]


def group_importance(layer: SelfAttention, scores: Tensor) -> Tensor:
    """Importance of each key/value group of ``layer``: the sum of its query heads' scores,
    ``(num_kv_heads,)``."""
    return scores.view(layer.num_kv_heads, layer.num_heads // layer.num_kv_heads).sum(1)


def _check_request(layers: list[SelfAttention],
                   heads_to_prune: dict[int, Sequence[int]]) -> dict[int, list[int]]:
    if not isinstance(heads_to_prune, dict):
        raise TypeError(
            f"heads_to_prune must be a dict {{layer: [heads]}}, got {type(heads_to_prune).__name__}"
        )
    request: dict[int, list[int]] = {}
    for layer_idx, heads in heads_to_prune.items():
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) \
                or not 0 <= layer_idx < len(layers):
            raise ValueError(
                f"unknown layer {layer_idx!r}: the model has {len(layers)} attention layers "
                f"(0..{len(layers) - 1})"
            )
        m = layers[layer_idx]
        try:
            heads = sorted(set(heads))
        except TypeError as e:
            raise TypeError(f"heads_to_prune[{layer_idx}] must be a list of ints") from e
        for h in heads:
            if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < m.num_heads:
                raise ValueError(
                    f"unknown head {h!r} in layer {layer_idx}: it has {m.num_heads} heads "
                    f"(0..{m.num_heads - 1})"
                )
        if not heads:
            continue
        if len(heads) == m.num_heads:
            raise ValueError(
                f"refusing to prune all {m.num_heads} heads of layer {layer_idx}: a layer keeps "
                "at least one head (one key/value group); remove the block from the model "
                "instead if it is not needed"
            )
        group = m.num_heads // m.num_kv_heads
        asked = set(heads)
        for g in sorted({h // group for h in heads}):
            members = set(range(g * group, (g + 1) * group))
            if not members <= asked:
                raise ValueError(
                    f"layer {layer_idx} uses grouped-query attention ({m.num_heads} query heads "
                    f"share {m.num_kv_heads} key/value heads): query heads {sorted(members)} "
                    f"form key/value group {g} and must be pruned together; missing "
                    f"{sorted(members - asked)}"
                )
        request[layer_idx] = heads
    return request


def _slice_linear(linear: nn.Linear, index: Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping ``index`` of the output (``dim=0``) or input (``dim=1``) features."""
    w = linear.weight.detach().index_select(dim, index).clone()
    out_f, in_f = w.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None,
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            bias = linear.bias.detach()
            new.bias.copy_(bias.index_select(0, index) if dim == 0 else bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    new.train(linear.training)
    return new


def _rows(heads: Sequence[int], head_dim: int, device) -> Tensor:
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)],
                        dtype=torch.long, device=device)


def _prune_layer(m: SelfAttention, heads: list[int]) -> None:
    group = m.num_heads // m.num_kv_heads
    removed = set(heads)
    keep_q = [h for h in range(m.num_heads) if h not in removed]
    # heads come in whole groups (checked), so a group survives iff its first head does
    keep_kv = [g for g in range(m.num_kv_heads) if g * group not in removed]
    device = m.q_proj.weight.device
    q_rows, kv_rows = _rows(keep_q, m.head_dim, device), _rows(keep_kv, m.head_dim, device)
    m.q_proj = _slice_linear(m.q_proj, q_rows, 0)
    m.k_proj = _slice_linear(m.k_proj, kv_rows, 0)
    m.v_proj = _slice_linear(m.v_proj, kv_rows, 0)
    m.out_proj = _slice_linear(m.out_proj, q_rows, 1)
    m.num_heads, m.num_kv_heads = len(keep_q), len(keep_kv)


def prune_heads(model: nn.Module, heads_to_prune: dict[int, Sequence[int]]) -> nn.Module:
    """Physically remove heads, in place: ``{layer: [head, ...]}`` (numbering in the module
    docstring). Returns ``model``.

    The rows of ``q_proj`` and the columns of ``out_proj`` owned by a removed query head go;
    for each removed key/value group the rows of ``k_proj`` and ``v_proj`` go too, and
    ``num_heads``/``num_kv_heads`` are updated (``head_dim`` and ``dim`` stay). The pruned model
    computes exactly what the unpruned one computes with those heads gated to zero.

    Raises:
        ValueError: unknown layer or head; a request that names only part of a grouped-query
            group (the message lists the group's heads); pruning every head of a layer; a model
            without attention layers. Nothing is changed when the request is refused.
    """
    layers = attention_layers(model)
    request = _check_request(layers, heads_to_prune)
    for layer_idx, heads in request.items():
        _prune_layer(layers[layer_idx], heads)
    return model


# ------------------------------------------------------------------------ iterative pruning


@dataclass
class PruneStep:
    """One point of :func:`iterative_prune`.

    ``heads``: query heads left; ``heads_per_layer``; ``fraction_pruned`` of the original
    query heads; ``metric`` from ``evaluate``; ``flops``/``params`` from :func:`attnkit.flops.count`
    on ``flop_inputs``; ``latency_s`` from ``latency_fn`` (``nan`` without one);
    ``removed``: ``{layer: [original head ids]}`` removed at this step.
    """

    step: int
    heads: int
    heads_per_layer: list[int]
    fraction_pruned: float
    metric: float
    flops: int
    params: int
    latency_s: float = math.nan
    removed: dict[int, list[int]] = field(default_factory=dict)


def iterative_prune(
    model: nn.Module,
    data: Iterable,
    evaluate: Callable[[nn.Module], float],
    fraction_per_step: float = 0.1,
    *,
    flop_inputs: tuple,
    loss_fn: Callable[[nn.Module, object], Tensor] = lm_loss,
    finetune: Callable[[nn.Module], None] | None = None,
    max_fraction: float = 1.0,
    normalize: bool = True,
    latency_fn: Callable[[nn.Module], float] | None = None,
    progress: Callable | None = None,
) -> list[PruneStep]:
    """Prune the least important heads step by step (Michel et al. 2019), in place.

    Each step scores heads with :func:`head_importance` on ``data`` (a re-iterable collection of
    batches, e.g. a list), removes the ``ceil(fraction_per_step * original heads)`` least
    important query heads (whole key/value groups for grouped-query layers, ranked by the
    summed score of their heads, so a step may remove up to a group more; every layer keeps
    one group), then calls ``finetune(model)`` if
    given and records a :class:`PruneStep`. Step 0 is the unpruned model. Stops when the next
    step would exceed ``max_fraction`` of the original heads or no layer has a group to spare.

    Args:
        model: pruned in place (``copy.deepcopy`` it first to keep the original).
        data: batches for the importance scores, passed to ``loss_fn(model, batch)``.
        evaluate: ``evaluate(model) -> float`` (any metric, e.g. bits per character).
        fraction_per_step: in ``(0, 1]``, of the original number of query heads.
        flop_inputs: inputs for :func:`attnkit.flops.count` (e.g. ``(ids,)``).
        finetune: optional brief training between steps, ``finetune(model)``.
        normalize: rank heads by per-layer L2-normalized scores (Michel et al.); ``False``
            ranks the raw expected gradients, comparing layers on the loss's own scale.
        latency_fn: optional ``latency_fn(model) -> seconds``, recorded each step.
        progress: optional ``progress(iterable, desc)`` wrapper (progress bar).
    """
    if not 0.0 < fraction_per_step <= 1.0:
        raise ValueError(f"fraction_per_step must be in (0, 1], got {fraction_per_step}")
    if not 0.0 < max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
    if not isinstance(flop_inputs, tuple):
        raise TypeError("flop_inputs must be a tuple of inputs for the model")
    data = list(data)
    layers = attention_layers(model)
    original = [list(range(m.num_heads)) for m in layers]  # current -> original head id
    total = sum(len(o) for o in original)
    per_step = max(1, math.ceil(fraction_per_step * total))

    def record(step: int, removed: dict[int, list[int]]) -> PruneStep:
        heads = [m.num_heads for m in layers]
        report = count(model, *flop_inputs)
        return PruneStep(
            step=step, heads=sum(heads), heads_per_layer=heads,
            fraction_pruned=1.0 - sum(heads) / total, metric=float(evaluate(model)),
            flops=report.total, params=report.params,
            latency_s=float(latency_fn(model)) if latency_fn is not None else math.nan,
            removed=removed)

    history = [record(0, {})]
    max_steps = math.ceil(total / per_step)
    steps = range(1, max_steps + 1)
    for step in (steps if progress is None else progress(steps, "prune")):
        scores = head_importance(model, data, loss_fn, normalize=normalize)
        # Candidates: (score, layer, group) for every group of a layer with more than one.
        candidates = []
        for i, (m, s) in enumerate(zip(layers, scores)):
            if m.num_kv_heads > 1:
                candidates += [(float(v), i, g) for g, v in enumerate(group_importance(m, s))]
        candidates.sort()
        chosen: dict[int, list[int]] = {}
        removed_heads = 0
        kv_left = [m.num_kv_heads for m in layers]
        for _, i, g in candidates:
            if removed_heads >= per_step:
                break
            m = layers[i]
            group = m.num_heads // m.num_kv_heads
            if kv_left[i] <= 1:
                continue
            if total - history[-1].heads + removed_heads + group > max_fraction * total + 1e-9:
                continue
            chosen.setdefault(i, []).extend(range(g * group, (g + 1) * group))
            kv_left[i] -= 1
            removed_heads += group
        if not chosen:
            break
        removed = {i: [original[i][h] for h in hs] for i, hs in chosen.items()}
        prune_heads(model, chosen)
        for i, hs in chosen.items():
            gone = set(hs)
            original[i] = [o for h, o in enumerate(original[i]) if h not in gone]
        if finetune is not None:
            finetune(model)
        history.append(record(step, removed))
    return history


def replay_prune(model: nn.Module, history: Sequence[PruneStep], upto_step: int) -> nn.Module:
    """A pruned copy of the unpruned ``model``: the heads that :func:`iterative_prune` removed
    in ``history[1 : upto_step + 1]`` (``removed`` holds original head ids, mapped here to the
    current numbering step by step). ``model`` itself is not changed."""
    if isinstance(upto_step, bool) or not isinstance(upto_step, int) \
            or not 0 <= upto_step < len(history):
        raise ValueError(f"upto_step must be in 0..{len(history) - 1}, got {upto_step!r}")
    pruned = copy.deepcopy(model)
    original = [list(range(m.num_heads)) for m in attention_layers(pruned)]
    for h in history[1:upto_step + 1]:
        request = {i: [original[i].index(o) for o in ids] for i, ids in h.removed.items()}
        prune_heads(pruned, request)
        for i, ids in h.removed.items():
            gone = set(ids)
            original[i] = [o for o in original[i] if o not in gone]
    return pruned


def random_prune_order(model: nn.Module,
                       generator: torch.Generator | None = None) -> list[tuple[int, list[int]]]:
    """A uniformly random order in which heads could be removed, the baseline of importance
    pruning: ``[(layer, [query heads]), ...]``, one key/value group per entry (one head for
    multi-head attention), never the last group of a layer.

    It is a random permutation of all groups with each layer's last-placed group dropped:
    exactly what removing groups in permutation order while skipping any that would empty its
    layer gives.
    """
    layers = attention_layers(model)
    units = []
    for i, m in enumerate(layers):
        group = m.num_heads // m.num_kv_heads
        units += [(i, list(range(g * group, (g + 1) * group))) for g in range(m.num_kv_heads)]
    perm = torch.randperm(len(units), generator=generator).tolist()
    order = [units[j] for j in perm]
    last = {i: k for k, (i, _) in enumerate(order)}  # each layer's last-placed group stays
    return [u for k, u in enumerate(order) if last[u[0]] != k]


@torch.no_grad()
def gated_curve(model: nn.Module, order: Sequence[tuple[int, Sequence[int]]],
                evaluate: Callable[[nn.Module], float],
                counts: Sequence[int] | None = None) -> list[tuple[int, float]]:
    """``evaluate(model)`` with the first ``k`` entries of ``order`` gated off, for each ``k``
    in ``counts`` (default ``0 .. len(order)``): ``[(query heads removed, metric), ...]``.

    ``order`` is ``[(layer, [heads]), ...]`` as from :func:`random_prune_order`. Gating a head
    to zero computes what :func:`prune_heads` would (tested), without copying the model.
    """
    layers = attention_layers(model)
    counts = range(len(order) + 1) if counts is None else counts
    for layer_idx, heads in order:
        if not 0 <= layer_idx < len(layers) or \
                not all(0 <= h < layers[layer_idx].num_heads for h in heads):
            raise ValueError(f"order names layer {layer_idx} heads {list(heads)}, outside the "
                             "model's attention layers / heads")
    device = next(model.parameters()).device
    out = []
    for k in counts:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(order):
            raise ValueError(f"counts must be ints in 0..{len(order)}, got {k!r}")
        gates = [torch.ones(m.num_heads, device=device) for m in layers]
        for layer_idx, heads in order[:k]:
            gates[layer_idx][list(heads)] = 0.0
        if any(bool((g == 0).all()) for g in gates):
            raise ValueError(f"the first {k} entries of order remove every head of a layer")
        with head_gates(model, gates):
            metric = float(evaluate(model))
        out.append((sum(len(h) for _, h in order[:k]), metric))
    return out


# ------------------------------------------------------------------------ save / load


def pruned_config(model: nn.Module) -> dict:
    """What rebuilds a pruned model: ``{"model": constructor config, "attention":
    [[num_heads, num_kv_heads] per layer]}``. The model must have a ``config`` (method or
    property returning its constructor arguments), e.g. :class:`attnkit.lm.DecoderLM`."""
    layers = attention_layers(model)
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"{type(model).__name__} has no config() to rebuild it from")
    cfg = cfg() if callable(cfg) else cfg
    return {"format": FORMAT, "model": dict(cfg),
            "attention": [[m.num_heads, m.num_kv_heads] for m in layers]}


def save_pruned(model: nn.Module, path: str | Path) -> None:
    """Save ``state_dict`` plus :func:`pruned_config` (plain tensors and Python literals, so
    :func:`load_pruned` reads it with ``torch.load(weights_only=True)``)."""
    torch.save({"config": pruned_config(model), "state_dict": model.state_dict()}, Path(path))


def _resize(m: SelfAttention, num_heads: int, num_kv_heads: int) -> None:
    """Give ``m`` projections for the given head counts (weights to be loaded afterwards)."""
    if not (isinstance(num_heads, int) and isinstance(num_kv_heads, int)
            and 1 <= num_kv_heads <= num_heads and num_heads % num_kv_heads == 0):
        raise ValueError(f"invalid head counts ({num_heads}, {num_kv_heads}) in the file")
    hd, dim = m.head_dim, m.dim
    like = m.q_proj.weight
    kw = dict(device=like.device, dtype=like.dtype)
    m.q_proj = nn.Linear(dim, num_heads * hd, bias=m.q_proj.bias is not None, **kw)
    m.k_proj = nn.Linear(dim, num_kv_heads * hd, bias=m.k_proj.bias is not None, **kw)
    m.v_proj = nn.Linear(dim, num_kv_heads * hd, bias=m.v_proj.bias is not None, **kw)
    m.out_proj = nn.Linear(num_heads * hd, dim, bias=m.out_proj.bias is not None, **kw)
    m.num_heads, m.num_kv_heads = num_heads, num_kv_heads


def load_pruned(path: str | Path, build: Callable[[dict], nn.Module] | None = None) -> nn.Module:
    """Load a model written by :func:`save_pruned` (no code from the file is executed).

    ``build(config)`` makes the unpruned architecture from the saved constructor config;
    default ``DecoderLM(**config)``. Its attention layers are then resized to the saved head
    counts and the weights loaded strictly.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or not isinstance(blob.get("config"), dict) \
            or blob["config"].get("format") != FORMAT or "state_dict" not in blob:
        raise ValueError(f"{path} is not a pruned model saved by attnkit.pruning.save_pruned")
    cfg = blob["config"]
    if build is None:
        from .lm.model import DecoderLM  # the default model; tools load lm only here
        build = lambda c: DecoderLM(**c)  # noqa: E731
    model = build(copy.deepcopy(cfg["model"]))
    layers = attention_layers(model)
    if len(layers) != len(cfg["attention"]):
        raise ValueError(
            f"{path} describes {len(cfg['attention'])} attention layers, the built model has "
            f"{len(layers)}"
        )
    for m, (nh, nkv) in zip(layers, cfg["attention"]):
        _resize(m, nh, nkv)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model


def measure_latency(model: nn.Module, *inputs, repeats: int = 5, warmup: int = 1) -> float:
    """Fastest of ``repeats`` wall-clock timings of ``model(*inputs)`` under ``no_grad`` (the
    minimum is the least disturbed by other processes on a shared CPU; still noisy there)."""
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                model(*inputs)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return min(times)
