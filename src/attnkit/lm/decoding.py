"""Autoregressive decoding: generation with KV caches (Hugging Face's conventions), the bytes
a decoding step reads and its memory roofline, and the measurements of a decoding step."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive_int
from ..kernels.native import huge_page_empty
from ..nn.attention import attention_layers
from .cache import DynamicCache, KVCache, QuantizedCache, SlidingWindowCache, StaticCache
from .model import _native_decoding

__all__ = [
    "generate",
    "kv_cache_bytes",
    "kv_bytes_per_token",
    "bits_per_char_cached",
    "weight_bytes",
    "decode_roofline",
    "measure_bandwidth",
    "time_per_token",
]


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
    if cache == "int8":
        return QuantizedCache()
    if cache == "sliding":
        window = getattr(model, "window", None)
        if window is None:
            raise ValueError('cache="sliding" needs a model built with window=...')
        return SlidingWindowCache(window)
    raise ValueError(
        f'cache must be "dynamic", "static", "sliding", "int8" or a KVCache, got {cache!r}'
    )


def _filtered_logits(logits: Tensor, temperature: float, top_k: int | None,
                     top_p: float | None) -> Tensor:
    """``logits (B, V)`` scaled by ``1 / temperature``, then ``-inf`` outside the ``top_k``
    most likely tokens and outside the smallest set whose probability reaches ``top_p``
    (nucleus sampling; the most likely token always stays), in Hugging Face's order."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _check_token_ids(name: str, value, vocab_size: int) -> list[int]:
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        values = list(values)
    except TypeError:
        values = [value]
    for t in values:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(
                f"{name} must be a token id (or a list of them) in [0, {vocab_size}), "
                f"got {value!r}"
            )
    if not values:
        raise ValueError(f"{name} must name at least one token id, got {value!r}")
    return values


def _check_attention_mask(mask: Tensor, ids: Tensor) -> Tensor | None:
    """A left-padded ``(B, L)`` 0/1 mask as a long tensor, or None if nothing is padded."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(mask).__name__}")
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, got "
            f"{tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.to(device=ids.device, dtype=torch.long)
    if bool((mask.sum(1) == 0).any()):
        raise ValueError("attention_mask has a row without any token")
    if bool((mask.diff(dim=1) < 0).any()):
        raise ValueError(
            "attention_mask must be left-padded (zeros before the tokens of each row): new "
            "tokens are appended at the right"
        )
    return None if bool(mask.all()) else mask


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int = 20,
    *,
    attention_mask: Tensor | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    cache: str | KVCache = "dynamic",
    on_token: Callable[[int | Tensor], None] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids``, with Hugging Face's
    conventions.

    Args:
        model: a :class:`attnkit.lm.DecoderLM` (any model with its ``forward(ids, *, cache,
            last_only, attention_mask)``, ``check_ids``, ``vocab_size`` and ``max_seq_len``).
        input_ids: ``(L,)`` or ``(B, L)`` token ids, ``L >= 1``; a batch of prompts of
            different lengths is left-padded (any valid id as padding) with ``attention_mask``.
        max_new_tokens: tokens to generate (``>= 0``); ``L + max_new_tokens`` must fit the
            model's ``max_seq_len`` (padding included).
        attention_mask: ``(B, L)`` (or ``(L,)``), 1 for tokens and 0 for left padding.
            Padded positions are never attended to; a left-padded row generates what it would
            alone (rotary attention sees relative positions only), up to rounding.
        do_sample: sample from the (filtered) distribution; ``False``: greedy (argmax),
            which gives the same tokens with and without the cache. Default: sample if
            ``temperature`` is given and positive (``temperature=0`` is greedy), else greedy.
        temperature: softmax temperature for sampling (default 1).
        top_k: sample only among the ``top_k`` most likely tokens.
        top_p: sample only among the most likely tokens whose probabilities sum to ``top_p``
            (nucleus sampling), in ``(0, 1]``.
        eos_token_id: a token id (or list of ids) that ends a row; later tokens of that row are
            ``pad_token_id``. Generation stops when every row has ended, so the result may be
            shorter than ``L + max_new_tokens``.
        pad_token_id: fills ended rows (default: the first ``eos_token_id``).
        use_cache: keep keys/values of past positions (one new position per step) instead of
            re-running the whole sequence every step.
        cache: ``"dynamic"``, ``"static"`` (preallocated for prompt + new tokens),
            ``"sliding"`` (the model's ``window``), ``"int8"`` (a :class:`QuantizedCache`) or
            a :class:`attnkit.lm.KVCache` instance. An instance must be empty (new, or emptied
            by its ``reset()``): the prompt is always run in full, so positions left by an
            earlier call raise ``ValueError``. After the call it holds the positions the model
            ran.
        on_token: called with each new token as soon as it exists (streaming): an ``int`` for a
            1-D prompt, a ``(B,)`` tensor for a batch. It may change the model (the next step
            runs the changed model). Without it, a :class:`DecoderLM`'s bound steps check the
            model once, not before every token: the model must not be changed from another
            thread during the call.
        generator: random generator for sampling (seeded: reproducible samples).

    Returns:
        The prompts followed by the new tokens, ``(L + n,)`` or ``(B, L + n)``,
        ``n <= max_new_tokens``.

    Raises:
        ValueError: ids outside ``[0, vocab_size)``, a prompt longer than the model's context
            (or prompt + ``max_new_tokens`` beyond it), a mask that is not left padding, and
            invalid options.
    """
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dim() not in (1, 2):
        raise ValueError(
            f"input_ids must have shape (L,) or (B, L), got {tuple(input_ids.shape)}"
        )
    if input_ids.shape[-1] == 0:
        raise ValueError("input_ids is empty: give at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if temperature is not None and (isinstance(temperature, bool)
                                    or not isinstance(temperature, (int, float))
                                    or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
    if do_sample is None:
        do_sample = temperature is not None and temperature > 0
    elif not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool or None, got {do_sample!r}")
    if do_sample and temperature == 0:
        raise ValueError("do_sample=True needs temperature > 0 (temperature=0 is greedy)")
    check_positive_int("top_k", top_k, optional=True)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a float in (0, 1], got {top_p!r}")
    vocab = model.vocab_size
    eos = None if eos_token_id is None else _check_token_ids("eos_token_id", eos_token_id,
                                                             vocab)
    if pad_token_id is not None:
        _check_token_ids("pad_token_id", pad_token_id, vocab)
    elif eos is not None:
        pad_token_id = eos[0]
    single = input_ids.dim() == 1
    ids = input_ids.unsqueeze(0) if single else input_ids
    device = next(model.parameters()).device
    ids = ids.to(device)
    length = ids.shape[1]
    if length > model.max_seq_len:
        raise ValueError(
            f"prompt of {length} positions is longer than the model's context "
            f"(max_seq_len={model.max_seq_len})"
        )
    total = length + max_new_tokens
    if total > model.max_seq_len:
        raise ValueError(
            f"prompt ({length}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"max_seq_len={model.max_seq_len}"
        )
    model.check_ids(ids)
    mask = None
    if attention_mask is not None:
        am = attention_mask.unsqueeze(0) if single and isinstance(attention_mask, Tensor) \
            and attention_mask.dim() == 1 else attention_mask
        mask = _check_attention_mask(am, ids)
    temp = 1.0 if temperature is None else float(temperature)
    rows = ids.shape[0]
    # the new tokens live as Python ints (one list per step): a native step takes and gives
    # ints, so a greedy step makes no tensor operation (each costs tens of microseconds after
    # a step has streamed the weights through the caches)
    eos_set = None if eos is None else set(eos)
    finished = [False] * rows
    new: list[list[int]] = []
    was_training = model.training
    model.eval()
    kv = _make_cache(cache, model, total) if use_cache else None
    # cached steps of a DecoderLM: one bound native call each where it applies
    fast = None if mask is not None else _native_decoding(model, kv, rows, total)
    step_input = ids  # the next model call's ids; None when they are only in new[-1]
    try:
        for _ in range(max_new_tokens):
            if kv is None:  # uncached: every step runs the whole sequence
                step_input = torch.cat([ids, _as_ids(new, ids)], dim=1)
            logits = chosen = None
            if fast is not None and (step_input is None or step_input.shape[1] == 1):
                # without on_token no other code runs between two steps of this loop: the
                # step then skips its checks (it rechecks after anything else ran)
                logits = fast.step(new[-1] if step_input is None else step_input[:, 0].tolist(),
                                   recheck=on_token is not None)
                if logits is not None and not do_sample:
                    chosen = fast.greedy()
            if logits is None:
                if step_input is None:
                    step_input = _as_ids(new[-1:], ids)
                kwargs = {} if mask is None else {"attention_mask": mask}
                logits = model(step_input, cache=kv, last_only=True, **kwargs)[:, -1]
            if chosen is None:
                if do_sample:
                    probs = torch.softmax(_filtered_logits(logits, temp, top_k, top_p), dim=-1)
                    chosen = torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()
                else:
                    chosen = logits.argmax(-1).tolist()
            if eos_set is not None:
                chosen = [pad_token_id if done else t for t, done in zip(chosen, finished)]
                finished = [done or t in eos_set for t, done in zip(chosen, finished)]
            new.append(chosen)
            step_input = None
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            if on_token is not None:
                on_token(chosen[0] if single else torch.tensor(chosen, device=device))
            if eos_set is not None and all(finished):
                break
    finally:
        model.train(was_training)
    result = torch.cat([ids, _as_ids(new, ids)], dim=1)
    return result[0] if single else result


def _as_ids(new: list[list[int]], like: Tensor) -> Tensor:
    """Steps' tokens (one list of ``B`` ids per step) as ``(B, steps)`` int64 ids on the
    device of ``like`` (the prompts)."""
    if not new:
        return torch.empty(like.shape[0], 0, dtype=torch.long, device=like.device)
    return torch.tensor(new, dtype=torch.long, device=like.device).T


# ------------------------------------------------------------------------ bytes and roofline


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def kv_cache_bytes(model: nn.Module, context_len: int, batch: int = 1,
                   dtype: torch.dtype | None = None, *, group_size: int = 64) -> int:
    """Bytes of keys and values for ``context_len`` positions: ``2 * sum over layers of
    num_kv_heads * head_dim * context_len * batch * itemsize`` (``dtype`` defaults to the
    model's).

    With ``dtype=torch.int8``, what a :class:`QuantizedCache` of that ``group_size`` holds
    when its capacity fits: one byte per key and value element, an fp32 scale per channel of
    every complete key group and per position of every value head, and the keys of the open
    group (``context_len % group_size`` positions) in the model's dtype."""
    for name, val in (("context_len", context_len), ("batch", batch)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    layers = attention_layers(model)
    model_item = torch.empty((), dtype=_model_dtype(model)).element_size()
    if dtype == torch.int8:
        check_positive_int("group_size", group_size)
        full, rest = divmod(context_len, group_size)
        total = 0
        for a in layers:
            width = a.num_kv_heads * a.head_dim
            total += (2 * width * (full * group_size + rest)  # int8 codes (keys, values)
                      + 4 * width * full  # key scales: per channel of each complete group
                      + 4 * a.num_kv_heads * context_len  # value scales: per position
                      + model_item * width * rest)  # open group of keys, unquantised
        return total * batch
    item = torch.empty((), dtype=dtype or _model_dtype(model)).element_size()
    per_pos = sum(2 * a.num_kv_heads * a.head_dim for a in layers)
    return per_pos * context_len * batch * item


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype | None = None, *,
                       group_size: int = 64) -> float:
    """Cache bytes per position and sequence: :func:`kv_cache_bytes` of one position, or for
    ``dtype=torch.int8`` of one complete key group divided by its positions (scales
    included)."""
    if dtype == torch.int8:
        return kv_cache_bytes(model, group_size, dtype=dtype, group_size=group_size) / group_size
    return float(kv_cache_bytes(model, 1, dtype=dtype))


@torch.no_grad()
def bits_per_char_cached(model: nn.Module, ids: Tensor, seq_len: int, max_chars: int,
                         cache_factory: Callable[[], KVCache] = DynamicCache) -> float:
    """Mean next-token cross-entropy in bits (bits per character for a character model) of
    ``ids (N,)`` decoded one position at a time through a cache from ``cache_factory``, so
    every prediction reads the past from the cache as generation does (e.g. 8-bit keys and
    values with ``QuantizedCache``). Windows of ``seq_len + 1`` tokens, non-overlapping, up to
    ``max_chars`` predicted tokens, all windows in one batch."""
    if not isinstance(ids, Tensor) or ids.dim() != 1:
        raise ValueError("ids must be a 1-D tensor of token ids")
    for name, val in (("seq_len", seq_len), ("max_chars", max_chars)):
        check_positive_int(name, val)
    windows = min(max_chars // seq_len, (ids.numel() - 1) // seq_len)
    if windows < 1:
        raise ValueError(f"ids ({ids.numel()}) and max_chars ({max_chars}) hold no window of "
                         f"{seq_len + 1} tokens")
    device = next(model.parameters()).device
    batch = ids[:windows * seq_len + 1].to(device)
    x = batch[:-1].view(windows, seq_len)
    y = torch.stack([batch[i * seq_len + 1:(i + 1) * seq_len + 1] for i in range(windows)])
    was_training = model.training
    model.eval()
    cache = cache_factory()
    nats = torch.zeros((), dtype=torch.float64)
    try:
        for t in range(seq_len):
            logits = model(x[:, t:t + 1], cache=cache, last_only=True)[:, -1]
            nats += F.cross_entropy(logits.float(), y[:, t], reduction="sum").double().cpu()
    finally:
        model.train(was_training)
    return float(nats) / (windows * seq_len) / math.log(2)


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


def measure_bandwidth(size_mb: int = 256, repeats: int = 5, *, huge_pages: bool = False) -> float:
    """This machine's memory read bandwidth (bytes/s) as torch sees it: the best of
    ``repeats`` full reductions over a ``size_mb`` fp32 buffer (much larger than CPU caches).
    ``huge_pages``: the buffer on transparent huge pages where the system grants them (as
    :class:`DecoderLM` puts its weights and the buffer caches their keys/values: see
    :func:`attnkit.kernels.native.huge_page_empty`), which streams faster than 4 KiB
    pages on some machines; the default measures an ordinary torch buffer."""
    if size_mb < 1 or repeats < 1:
        raise ValueError("size_mb and repeats must be >= 1")
    n = size_mb * (1 << 20) // 4
    buf = huge_page_empty([(n,)])[0] if huge_pages else torch.empty(n)
    buf.fill_(1.0)
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
