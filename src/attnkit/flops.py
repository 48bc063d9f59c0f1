"""FLOP and parameter counts that follow the attention pattern actually used.

:func:`count` runs one forward pass with hooks and counts the matrix products:

* every ``nn.Linear``: ``2 * in_features * out_features`` per token (multiply + add; the bias
  add is not counted, as in ``torch.utils.flop_counter.FlopCounterMode``);
* every :class:`attnkit.nn.SelfAttention` core: ``2 * D`` for ``q.k`` and ``2 * Dv`` for
  ``weights @ v`` per *allowed* (query, key) pair and query head, i.e.
  ``2 * B * Hq * nnz * (D + Dv)`` with ``nnz = pattern.nnz(Lq, Lk)`` (``Lq * Lk`` without a
  pattern): a causal pattern costs about half of a dense one, a sliding window ``O(L * w)``.
  With a KV cache ``Lk`` includes the cached keys and the pattern is the one the cache hands
  the layer. Grouped-query attention is visible in the smaller ``k_proj``/``v_proj``.

Softmax, normalisation, activations, rotary embeddings and embedding lookups are not counted
(they are ``O(elements)``, not matrix products). Attention cores of modules other than
:class:`~attnkit.nn.SelfAttention` are not seen (their ``nn.Linear`` layers are).
torch's ``FlopCounterMode`` counts the same Linear FLOPs but charges scaled-dot-product
attention for every ``Lq x Lk`` pair whatever the mask, so it over-counts causal attention
about 2x and does not see the structure of sparse patterns (see ``tests/test_flops.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .nn.attention import SelfAttention

__all__ = ["FlopReport", "ModuleCount", "count", "attention_core_flops", "attention_flop_share"]


@dataclass
class ModuleCount:
    """FLOPs of one forward pass and parameters of a module, its submodules included."""

    flops: int = 0
    params: int = 0


@dataclass
class FlopReport:
    """Result of :func:`count`.

    Attributes:
        total: FLOPs of the forward pass (``linear + attention``).
        linear: FLOPs of all ``nn.Linear`` matrix products.
        attention: FLOPs of the attention cores (``q.k`` and ``weights @ v``).
        params: distinct parameters of the model (tied weights counted once).
        by_module: qualified module name (``""`` is the model) -> :class:`ModuleCount`.
    """

    total: int
    linear: int
    attention: int
    params: int
    by_module: dict[str, ModuleCount] = field(default_factory=dict)

    def __str__(self) -> str:
        rows = [f"{'module':<40} {'FLOPs':>14} {'params':>12}"]
        for name, c in self.by_module.items():
            rows.append(f"{name or '(model)':<40} {c.flops:>14,} {c.params:>12,}")
        return "\n".join(rows)


def attention_core_flops(batch: int, num_heads: int, lq: int, lk: int, head_dim: int,
                         value_dim: int | None = None, pattern=None) -> int:
    """FLOPs of ``softmax(q k^T) v`` restricted to the pattern's allowed pairs:
    ``2 * batch * num_heads * nnz * (head_dim + value_dim)``."""
    value_dim = head_dim if value_dim is None else value_dim
    nnz = lq * lk if pattern is None else int(pattern.nnz(lq, lk))
    return 2 * batch * num_heads * nnz * (head_dim + value_dim)


def _unique_params(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@torch.no_grad()
def count(model: nn.Module, *inputs, **kwargs) -> FlopReport:
    """Count the FLOPs of ``model(*inputs, **kwargs)`` (one forward pass, run under no_grad)
    and the parameters of every submodule.

    Args:
        model: any ``nn.Module``; its ``nn.Linear`` layers and
            :class:`attnkit.nn.SelfAttention` cores are counted (see the module docstring).
        inputs, kwargs: passed to ``model``, e.g. ``count(lm, ids)`` with ``ids (B, L)``, or
            ``count(lm, new_ids, cache=kv)`` for a cached decoding step (the cache is updated).

    Returns:
        A :class:`FlopReport`; ``by_module`` includes every module, FLOPs rolled up to parents.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    names = {m: n for n, m in model.named_modules()}
    own: dict[str, list[int]] = {}  # name -> [linear flops, attention flops]
    handles = []

    def add(module: nn.Module, linear: int, attn: int) -> None:
        slot = own.setdefault(names[module], [0, 0])
        slot[0] += linear
        slot[1] += attn

    def linear_hook(module: nn.Linear, args, output) -> None:
        x = args[0]
        tokens = x.numel() // module.in_features
        add(module, 2 * module.in_features * module.out_features * tokens, 0)

    def attention_pre_hook(module: SelfAttention, args, kwargs):
        x = args[0] if args else kwargs["x"]
        b, lq = x.shape[0], x.shape[1]
        cache = kwargs.get("cache")
        pattern = module.pattern
        lk = lq
        if cache is not None:
            # Keys attended = those held before this call plus the new ones; the cache decides
            # the pattern against them (a single causal query sees every key).
            lk = cache.held_length(module.layer_idx) + lq
            pattern = cache.attention_pattern(pattern, lq, lk)
        add(module, 0, attention_core_flops(b, module.num_heads, lq, lk, module.head_dim,
                                            pattern=pattern))

    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, SelfAttention):
            handles.append(m.register_forward_pre_hook(attention_pre_hook, with_kwargs=True))
    try:
        model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()

    by_module: dict[str, ModuleCount] = {}
    for name, module in model.named_modules():
        by_module[name] = ModuleCount(0, _unique_params(module))
    for name, (lin, att) in own.items():
        parts = name.split(".") if name else []
        for i in range(len(parts) + 1):
            by_module[".".join(parts[:i])].flops += lin + att
    linear = sum(v[0] for v in own.values())
    attention = sum(v[1] for v in own.values())
    return FlopReport(total=linear + attention, linear=linear, attention=attention,
                      params=_unique_params(model), by_module=by_module)



def attention_flop_share(model: nn.Module, *inputs, **kwargs) -> tuple[float, float]:
    """Share of ``model(*inputs, **kwargs)``'s counted FLOPs spent in attention:
    ``(whole layers, cores)``. "Whole layers" is every :class:`~attnkit.nn.SelfAttention`
    module (q/k/v/out projections plus the core): what removing every head could save at
    most. "Cores" is ``q.k`` and ``weights @ v`` alone (:attr:`FlopReport.attention`)."""
    report = count(model, *inputs, **kwargs)
    if report.total == 0:
        raise ValueError("the forward pass counted no FLOPs: no share to report")
    layers = {n for n, m in model.named_modules() if isinstance(m, SelfAttention)}
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no attnkit.nn.SelfAttention layers")
    # by_module rolls FLOPs up to parents; a SelfAttention inside another is counted once.
    top = [n for n in layers if not any(n.startswith(o + ".") for o in layers if o != n)]
    whole = sum(report.by_module[n].flops for n in top)
    return whole / report.total, report.attention / report.total
