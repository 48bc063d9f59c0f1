"""Training a language model: next-token training on a token stream, and the multi-head ->
grouped/multi-query conversion (mean-pooled K/V heads, Ainslie et al. 2023) with uptraining."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive_int
from ..distributed.data_parallel import all_reduce_mean, rescale_mean, shard, wrap_ddp
from ..nn.attention import attention_layers

__all__ = ["convert_kv_heads", "train_lm", "uptrain"]


@torch.no_grad()
def convert_kv_heads(model: nn.Module, num_kv_heads: int) -> nn.Module:
    """A copy of ``model`` whose attention layers have ``num_kv_heads`` key/value heads.

    Each new key (value) head is the mean of the projections of the old heads in its group
    (heads ``g*r .. g*r + r - 1`` with ``r = old // new``; query head ``h`` reads group
    ``h // (num_heads // num_kv_heads)``), the checkpoint conversion of the GQA paper. With
    ``num_kv_heads`` equal to the current count the copy computes exactly what ``model`` does.
    The input model is not modified; quality recovers with :func:`uptrain`.
    """
    check_positive_int("num_kv_heads", num_kv_heads)
    for layer in attention_layers(model):
        if layer.num_heads % num_kv_heads or layer.num_kv_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads={num_kv_heads} must divide num_heads={layer.num_heads} and the "
                f"current num_kv_heads={layer.num_kv_heads}"
            )
    new = copy.deepcopy(model)
    for layer in attention_layers(new):
        ratio = layer.num_kv_heads // num_kv_heads
        for name in ("k_proj", "v_proj"):
            old: nn.Linear = getattr(layer, name)
            d = layer.head_dim
            w = old.weight.view(num_kv_heads, ratio, d, old.in_features).mean(1)
            # type(old): keeps e.g. SplitLinear's fast decoding path
            lin = type(old)(old.in_features, num_kv_heads * d, bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
            lin.weight.copy_(w.reshape(num_kv_heads * d, old.in_features))
            if old.bias is not None:
                lin.bias.copy_(old.bias.view(num_kv_heads, ratio, d).mean(1).reshape(-1))
            setattr(layer, name, lin)
        layer.num_kv_heads = num_kv_heads
    if hasattr(new, "num_kv_heads"):
        new.num_kv_heads = num_kv_heads
    return new


def train_lm(
    model: nn.Module,
    data: Tensor,
    steps: int,
    *,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 3e-3,
    warmup: int = 20,
    weight_decay: float = 0.01,
    seed: int = 0,
    progress: Callable | None = None,
    callback: Callable[[int, float], bool] | None = None,
) -> list[float]:
    """Next-token training on random windows of the 1-D token stream ``data``.

    AdamW, linear warmup then cosine decay, gradient clipping at 1. Returns the loss (nats) of
    each step run. ``progress(iterable, desc)`` may wrap the step loop (e.g. a progress bar).
    ``callback(steps_done, loss)`` runs after every step (e.g. to evaluate on validation data);
    returning True stops training there (early stopping: the returned list is then shorter
    than ``steps``). A callback that evaluates must put the model back in training mode.

    Under ``torchrun`` (see :mod:`attnkit.distributed.data_parallel`) every rank draws the same
    ``batch_size`` windows, trains a ``DistributedDataParallel`` copy on its share of them and
    returns the whole batch's loss: the same steps as one process on the whole batch.
    """
    if not isinstance(data, Tensor) or data.dim() != 1:
        raise ValueError("data must be a 1-D tensor of token ids")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if data.numel() < seq_len + 2:
        raise ValueError(f"data has {data.numel()} tokens, need more than seq_len+1={seq_len+1}")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                            betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    offsets = torch.arange(seq_len + 1)
    losses = []
    net = wrap_ddp(model)  # the model itself unless running under torchrun
    model.train()
    loop = range(steps) if progress is None else progress(range(steps), "train")
    for _ in loop:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size, 1), generator=gen)
        batch = shard(data[starts + offsets].to(device))  # this rank's windows
        logits = net(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss = rescale_mean(loss, batch[:, 1:].numel())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(all_reduce_mean(loss.detach()).item())
        if callback is not None and callback(len(losses), losses[-1]):
            break
    model.eval()
    return losses


def uptrain(model: nn.Module, data: Tensor, steps: int, **kwargs) -> list[float]:
    """Briefly continue training a converted model (:func:`convert_kv_heads`) on ``data`` (a
    1-D token tensor) so it adapts to its shared key/value heads. Same options as
    :func:`train_lm`, with a lower default learning rate (1e-3) and short warmup."""
    kwargs.setdefault("lr", 1e-3)
    kwargs.setdefault("warmup", max(1, min(10, steps // 5)))
    return train_lm(model, data, steps, **kwargs)


