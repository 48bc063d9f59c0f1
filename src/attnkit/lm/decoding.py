"""Autoregressive decoding: generation with KV caches, multi-head -> grouped/multi-query
conversion (mean-pooled K/V heads, Ainslie et al. 2023) with uptraining, and the memory
roofline of a decoding step."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import DynamicCache, KVCache, SlidingWindowCache, StaticCache
from .distributed.data_parallel import all_reduce_mean, rescale_mean, shard, wrap_ddp
from .nn.attention import SelfAttention

__all__ = [
    "generate",
    "convert_kv_heads",
    "train_lm",
    "uptrain",
    "kv_cache_bytes",
    "weight_bytes",
    "decode_roofline",
    "measure_bandwidth",
    "time_per_token",
]


def _attn_layers(model: nn.Module) -> list[SelfAttention]:
    layers = [m for m in model.modules() if isinstance(m, SelfAttention)]
    if not layers:
        raise ValueError("model has no attnkit.nn.SelfAttention layers")
    return layers


def _make_cache(cache: str | KVCache, model: nn.Module, total_len: int) -> KVCache:
    if isinstance(cache, KVCache):
        held = max((cache.seq_length(i) for i in range(cache.num_layers)), default=0)
        if held:
            # generate() feeds the whole prompt: on top of an earlier call's positions it would
            # be appended after them and attend to them
            raise ValueError(
                f"cache already holds {held} positions from an earlier call; generate() needs "
                "an empty cache: pass a new one or call cache.reset() first"
            )
        return cache
    if cache == "dynamic":
        return DynamicCache()
    if cache == "static":
        return StaticCache(total_len)
    if cache == "sliding":
        window = getattr(model, "window", None)
        if window is None:
            raise ValueError('cache="sliding" needs a model built with window=...')
        return SlidingWindowCache(window)
    raise ValueError(
        f'cache must be "dynamic", "static", "sliding" or a KVCache, got {cache!r}'
    )


def _next_token(logits: Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> Tensor:
    """``logits (B, V)`` -> ``(B,)`` token ids."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    use_cache: bool = True,
    cache: str | KVCache = "dynamic",
    on_token: Callable[[int | Tensor], None] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample ``max_new_tokens`` tokens after ``prompt_ids``.

    Args:
        model: a :class:`attnkit.models.DecoderLM` (any model with its ``forward(ids, *, cache,
            last_only)``, ``check_ids`` and ``max_seq_len``).
        prompt_ids: ``(L,)`` or ``(B, L)`` token ids, ``L >= 1``.
        max_new_tokens: tokens to generate (``>= 0``); prompt + new must fit ``max_seq_len``.
        temperature: softmax temperature; ``0`` means greedy decoding (argmax), which gives the
            same tokens with and without the cache.
        top_k: sample only among the ``top_k`` most likely tokens.
        use_cache: keep keys/values of past positions (one new position per step) instead of
            re-running the whole sequence every step.
        cache: ``"dynamic"``, ``"static"`` (preallocated for prompt + new tokens),
            ``"sliding"`` (the model's ``window``) or a :class:`attnkit.cache.KVCache` instance.
            An instance must be empty (new, or emptied by its ``reset()``): the prompt is always
            run in full, so positions left by an earlier call raise ``ValueError``. After the
            call it holds the positions the model ran.
        on_token: called with each new token as soon as it exists (streaming): an ``int`` for a
            1-D prompt, a ``(B,)`` tensor for a batch.
        generator: random generator for sampling.

    Returns:
        The prompt followed by the new tokens, ``(L + max_new_tokens,)`` or ``(B, ...)``.
    """
    if not isinstance(prompt_ids, Tensor):
        raise TypeError(f"prompt_ids must be a tensor, got {type(prompt_ids).__name__}")
    if prompt_ids.dim() not in (1, 2):
        raise ValueError(
            f"prompt_ids must have shape (L,) or (B, L), got {tuple(prompt_ids.shape)}"
        )
    if prompt_ids.shape[-1] == 0:
        raise ValueError("prompt_ids is empty: give at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    single = prompt_ids.dim() == 1
    ids = prompt_ids.unsqueeze(0) if single else prompt_ids
    device = next(model.parameters()).device
    ids = ids.to(device)
    model.check_ids(ids)
    total = ids.shape[1] + max_new_tokens
    if total > model.max_seq_len:
        raise ValueError(
            f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"max_seq_len={model.max_seq_len}"
        )
    was_training = model.training
    model.eval()
    kv = _make_cache(cache, model, total) if use_cache else None
    out = [ids]
    step_input = ids
    try:
        for _ in range(max_new_tokens):
            if kv is None:
                step_input = torch.cat(out, dim=1)
            logits = model(step_input, cache=kv, last_only=True)[:, -1]
            token = _next_token(logits, float(temperature), top_k, generator)
            step_input = token.unsqueeze(1)
            out.append(step_input)
            if on_token is not None:
                on_token(int(token[0]) if single else token)
    finally:
        model.train(was_training)
    result = torch.cat(out, dim=1)
    return result[0] if single else result


# ------------------------------------------------------------------------ MHA -> GQA / MQA


@torch.no_grad()
def convert_kv_heads(model: nn.Module, num_kv_heads: int) -> nn.Module:
    """A copy of ``model`` whose attention layers have ``num_kv_heads`` key/value heads.

    Each new key (value) head is the mean of the projections of the old heads in its group
    (heads ``g*r .. g*r + r - 1`` with ``r = old // new``; query head ``h`` reads group
    ``h // (num_heads // num_kv_heads)``), the checkpoint conversion of the GQA paper. With
    ``num_kv_heads`` equal to the current count the copy computes exactly what ``model`` does.
    The input model is not modified; quality recovers with :func:`uptrain`.
    """
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
        raise ValueError(f"num_kv_heads must be a positive int, got {num_kv_heads!r}")
    for layer in _attn_layers(model):
        if layer.num_heads % num_kv_heads or layer.num_kv_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads={num_kv_heads} must divide num_heads={layer.num_heads} and the "
                f"current num_kv_heads={layer.num_kv_heads}"
            )
    new = copy.deepcopy(model)
    for layer in _attn_layers(new):
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
) -> list[float]:
    """Next-token training on random windows of the 1-D token stream ``data``.

    AdamW, linear warmup then cosine decay, gradient clipping at 1. Returns the loss (nats) of
    each step. ``progress(iterable, desc)`` may wrap the step loop (e.g. a progress bar).

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
    model.eval()
    return losses


def uptrain(model: nn.Module, data: Tensor, steps: int, **kwargs) -> list[float]:
    """Briefly continue training a converted model (:func:`convert_kv_heads`) on ``data`` (a
    1-D token tensor) so it adapts to its shared key/value heads. Same options as
    :func:`train_lm`, with a lower default learning rate (1e-3) and short warmup."""
    kwargs.setdefault("lr", 1e-3)
    kwargs.setdefault("warmup", max(1, min(10, steps // 5)))
    return train_lm(model, data, steps, **kwargs)


# ------------------------------------------------------------------------ bytes and roofline


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def kv_cache_bytes(model: nn.Module, context_len: int, batch: int = 1,
                   dtype: torch.dtype | None = None) -> int:
    """Bytes of keys and values for ``context_len`` positions: ``2 * sum over layers of
    num_kv_heads * head_dim * context_len * batch * itemsize`` (``dtype`` defaults to the
    model's)."""
    for name, val in (("context_len", context_len), ("batch", batch)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    item = torch.empty((), dtype=dtype or _model_dtype(model)).element_size()
    per_pos = sum(2 * a.num_kv_heads * a.head_dim for a in _attn_layers(model))
    return per_pos * context_len * batch * item


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, shared (tied) tensors counted once: every decoding step
    reads all of them (the tied embedding through the output layer)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def decode_roofline(model: nn.Module, context_len: int, bandwidth_bytes_per_s: float,
                    batch: int = 1) -> float:
    """Lower bound on seconds per decoding step: bytes that must be read (all weights once, the
    KV cache of ``context_len`` positions) divided by the memory bandwidth."""
    if not bandwidth_bytes_per_s > 0:
        raise ValueError(f"bandwidth_bytes_per_s must be > 0, got {bandwidth_bytes_per_s}")
    total = weight_bytes(model) + kv_cache_bytes(model, context_len, batch)
    return total / float(bandwidth_bytes_per_s)


def measure_bandwidth(size_mb: int = 256, repeats: int = 5) -> float:
    """This machine's memory read bandwidth (bytes/s) as torch sees it: the best of
    ``repeats`` full reductions over a ``size_mb`` fp32 buffer (much larger than CPU caches)."""
    if size_mb < 1 or repeats < 1:
        raise ValueError("size_mb and repeats must be >= 1")
    buf = torch.ones(size_mb * (1 << 20) // 4)
    buf.sum()  # warm up: first touch, thread pool
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


@torch.no_grad()
def time_per_token(model: nn.Module, context_len: int, *, steps: int, use_cache: bool,
                   cache: str | KVCache = "dynamic", seed: int = 0) -> float:
    """Seconds per greedy decoding step after a random prompt of ``context_len`` tokens.

    Cached: the median interval between streamed tokens after the first (the prefill is not
    counted). Uncached: every token re-runs the whole sequence, so the median over all tokens.
    The median resists pauses from other processes on a shared machine.
    """
    if steps < 2:
        raise ValueError("steps must be >= 2")
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.vocab_size, (context_len,), generator=gen)
    stamps: list[float] = []
    t0 = time.perf_counter()
    generate(model, prompt, steps, temperature=0, use_cache=use_cache, cache=cache,
             on_token=lambda _tok: stamps.append(time.perf_counter()))
    times = torch.tensor(stamps if use_cache else [t0, *stamps], dtype=torch.float64)
    return float(times.diff().median())
