"""A small pre-LN decoder-only transformer language model on
:class:`attnkit.nn.SelfAttention`, and its fused decoding step.

A decoding step (a few rows, no autograd, fp32 on CPU) runs each block as four native GEMV
calls around the engine's attention: LayerNorm + q/k/v projections + rotary embedding,
output projection + residual, LayerNorm + first MLP layer + GELU, second MLP layer +
residual (:mod:`attnkit.kernels.native`). With one new token per sequence and a buffer cache,
a block is one native call, and a whole :class:`DecoderLM` step (every block, the final
LayerNorm and the output layer) is one. Anything else (autograd, hooks, swapped layers, a
head mask) takes the modules' own path, with the same results up to rounding.
"""

from __future__ import annotations

import ctypes
import operator
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_mod

from ..checks import check_positive_int
from ..kernels import native
from ..nn.attention import SelfAttention, SplitLinear, split_linear
from ..patterns import causal, sliding_window
from .cache import KVCache, _BufferCache

__all__ = ["DecoderLM", "DecoderBlock", "GeluMLP"]


def _identity(x: Tensor) -> Tensor:
    return x


def _has_hooks(*modules: nn.Module) -> bool:
    """Whether calling these modules would run forward hooks (their own or global ones)."""
    if _module_mod._global_forward_hooks or _module_mod._global_forward_pre_hooks:
        return True
    for mod in modules:
        if mod._forward_hooks or mod._forward_pre_hooks:
            return True
    return False


class _Watch:
    """What a prepared decoding step was built from, recorded as the checks read it, so a later
    step can confirm nothing changed in a few flat loops instead of re-running the checks:
    dictionary entries (modules, parameters, plain attributes such as a LayerNorm's eps or the
    block's ``training``, through its ``__dict__``) that must still be the same objects, hook
    dictionaries that must stay empty, dictionaries whose size must stay, and tensors whose
    memory must stay where it was (and contiguous). The loops run in C (``map``): a step
    checks ~300 entries in microseconds."""

    __slots__ = ("dicts", "keys", "values", "empty", "sizes", "lengths", "tensors", "ptrs")

    def __init__(self) -> None:
        self.dicts: list[dict] = []
        self.keys: list[str] = []
        self.values: list[object] = []
        self.empty: list[dict] = []
        self.sizes: list[dict] = []
        self.lengths: list[int] = []
        self.tensors: list[Tensor] = []
        self.ptrs: list[int] = []

    def hooks(self, *mods: nn.Module) -> None:
        """Their forward hooks stay absent."""
        for m in mods:
            self.empty += (m._forward_hooks, m._forward_pre_hooks)

    def entries(self, d: dict, *keys: str) -> None:
        for k in keys:
            self.dicts.append(d)
            self.keys.append(k)
            self.values.append(d.get(k))

    def size(self, d: dict) -> None:
        self.sizes.append(d)
        self.lengths.append(len(d))

    def memory(self, *tensors: Tensor | None) -> None:
        for t in tensors:
            if t is not None:
                self.tensors.append(t)
                self.ptrs.append(t.data_ptr())

    def unchanged(self) -> bool:
        return (not any(self.empty)
                and all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.values))
                and list(map(len, self.sizes)) == self.lengths
                and list(map(Tensor.data_ptr, self.tensors)) == self.ptrs
                and all(map(Tensor.is_contiguous, self.tensors)))


class _PreparedStep:
    """A block's four decoding-step products bound once (:class:`native.PreparedGemv`): the
    LayerNorm + q/k/v projections + rotary embedding, the output projection (+ residual),
    the LayerNorm + first MLP layer + GELU, the second MLP layer (+ residual). Kept per
    block in :data:`_PREPARED` and rebuilt when an operand changed (another tensor object, or
    the same parameter with new memory after ``.data`` was replaced)."""

    def __init__(self, block: DecoderBlock, operands: tuple) -> None:
        qw, kw, vw, qb, kb, vb, n1w, n1b, ow, ob, n2w, n2b, f1w, f1b, f2w, f2b, eps1, eps2 = \
            operands
        attn = block.attn
        heads = attn.num_heads + attn.num_kv_heads  # queries and keys are rotated
        rope_cols = 0 if attn.rotary is None else heads * attn.head_dim
        self.operands = operands
        self.ptrs = _addresses(operands)
        self.qkv = native.PreparedGemv((qw, kw, vw), (qb, kb, vb), layer_norm=(n1w, n1b, eps1),
                                       rope_cols=rope_cols, rope_dim=attn.head_dim)
        self.out = native.PreparedGemv((ow,), (ob,))
        self.fc1 = native.PreparedGemv((f1w,), (f1b,), gelu=True, layer_norm=(n2w, n2b, eps2))
        self.fc2 = native.PreparedGemv((f2w,), (f2b,))
        # the whole step as one native call, for one new token per sequence with a buffer cache
        self.block = (native.PreparedDecodeBlock(operands, num_heads=attn.num_heads,
                                                 num_kv_heads=attn.num_kv_heads,
                                                 rotary=attn.rotary is not None)
                      if native.step_available() else None)

    def matches(self, operands: tuple) -> bool:
        return _same_bound(operands, self.operands, self.ptrs)


def _bindable(*tensors: Tensor | None) -> bool:
    """Whether the native decoding kernels can read these (optional) operands in place:
    contiguous fp32 CPU tensors."""
    return all(t is None or (t.dtype == torch.float32 and t.is_cpu and t.is_contiguous())
               for t in tensors)


def _addresses(operands: tuple) -> tuple:
    """What a prepared step binds of its operands: a tensor's address, any other value."""
    return tuple(t.data_ptr() if isinstance(t, Tensor) else t for t in operands)


def _same_bound(operands: tuple, bound: tuple, ptrs: tuple) -> bool:
    """Whether ``operands`` are what a prepared step bound (``bound``, at ``ptrs`` from
    :func:`_addresses`): the same tensor objects still at the same addresses (a parameter whose
    ``.data`` was replaced must be bound again), other values equal."""
    for new, old, ptr in zip(operands, bound, ptrs):
        if isinstance(new, Tensor):
            if new is not old or new.data_ptr() != ptr:
                return False
        elif new != old:
            return False
    return True


# Per block, weakly (a block dropped drops its entry; the bound argument arrays are never
# pickled or copied with the model).
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decode_block(block: DecoderBlock, operands: tuple, x: Tensor, cache: KVCache | None,
                  key_padding_mask: Tensor | None) -> Tensor:
    """A pre-LN block on ``x (B, L, dim)`` during decoding: four prepared native GEMV calls
    (LayerNorms, rotary embedding, GELU and residuals fused in) around the engine's attention.
    ``operands``: from :meth:`DecoderBlock._decode_operands` (the native path applies)."""
    step = _PREPARED.get(block)
    if step is None or not step.matches(operands):
        step = _PREPARED[block] = _PreparedStep(block, operands)
    attn = block.attn
    b, length, dim = x.shape
    rows = b * length
    x2 = x.reshape(rows, dim).contiguous()
    offset = 0 if cache is None else cache.seq_length(attn.layer_idx)
    rope = None
    if attn.rotary is not None:
        rope = attn.rotary.cos_sin(offset, offset + length, x.device, x.dtype)
    if (step.block is not None and length == 1 and key_padding_mask is None
            and isinstance(cache, _BufferCache)):
        # one new token per sequence, every cached position visible: the whole block in one
        # native call that writes the new keys/values into the cache's buffers itself
        slot = cache._decode_slot(attn.layer_idx, b, attn.num_kv_heads, attn.head_dim,
                                  attn.pattern)
        if slot is not None:
            out = step.block(x2, x2.new_empty(rows, dim), *slot, rope=rope)
            cache._advance(attn.layer_idx, 1)
            return out.view(b, length, dim)
    qkv = step.qkv(x2, x2.new_empty(rows, step.qkv.out_features), rope=rope)
    h, hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = qkv.view(b, length, h + 2 * hkv, hd).transpose(1, 2).split((h, hkv, hkv), dim=1)
    heads, _ = attn.attend(q, k, v, cache=cache, key_padding_mask=key_padding_mask)
    x2 = step.out(heads.reshape(rows, -1).contiguous(), x2.new_empty(rows, dim), residual=x2)
    hidden = step.fc1(x2, x2.new_empty(rows, step.fc1.out_features))
    return step.fc2(hidden, x2.new_empty(rows, dim), residual=x2).view(b, length, dim)


class _PreparedModel:
    """A :class:`DecoderLM`'s whole decoding step bound once (:class:`native.PreparedDecodeModel`):
    its blocks' prepared steps in order, then (``head`` given) the final LayerNorm and the
    output layer; ``layers``: per block its layer index, key/value heads, head dim, attention
    pattern and rotary module; ``watch``: what it was built from (a step checks only that).
    Kept per model in :data:`_PREPARED_MODELS`."""

    def __init__(self, steps: tuple, head: tuple | None, layers: list, watch: _Watch) -> None:
        self.steps, self.head, self.layers, self.watch = steps, head, layers, watch
        self.head_ptrs = None if head is None else _addresses(head)
        norm, out = (None, None) if head is None else ((head[0], head[1], head[2]),
                                                       (head[3], head[4]))
        self.call = native.PreparedDecodeModel([s.block for s in steps], norm=norm, head=out)


_PREPARED_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prepare_model(model: DecoderLM, x: Tensor) -> _PreparedModel | None:
    """Check every block (as :meth:`DecoderBlock._decode_operands` does) and the output layer,
    and bind the one-call step; None when some block cannot take it."""
    steps, layers, seen = [], [], set()
    watch = _Watch()
    watch.entries(model._modules, "blocks", "norm", "head")
    blocks = model.blocks._modules
    watch.entries(blocks, *blocks.keys())
    watch.size(blocks)
    for block in blocks.values():
        if type(block) is not DecoderBlock or _has_hooks(block):
            return None
        operands = block._decode_operands(x, watch)
        if operands is None:
            return None
        step = _PREPARED.get(block)
        if step is None or not step.matches(operands):
            step = _PREPARED[block] = _PreparedStep(block, operands)
        attn = block.attn
        if step.block is None or attn.layer_idx in seen:
            return None  # (a layer index twice: the blocks would share one cache slot)
        seen.add(attn.layer_idx)
        watch.entries(attn.__dict__, "layer_idx", "num_kv_heads", "head_dim", "pattern")
        steps.append(step)
        layers.append((attn.layer_idx, attn.num_kv_heads, attn.head_dim, attn.pattern,
                       attn.rotary))
    if not steps:
        return None
    norm, head = model.norm, model.head
    head_operands = None
    if (type(norm) is nn.LayerNorm and type(head) in (SplitLinear, nn.Linear)
            and not _has_hooks(norm, head)):
        hw, hb, nw, nb = head.weight, head.bias, norm.weight, norm.bias
        if _bindable(hw, hb, nw, nb) and hw.shape == (model.vocab_size, x.shape[2]):
            head_operands = (nw, nb, norm.eps, hw, hb)
            watch.hooks(norm, head)
            watch.entries(norm.__dict__, "eps")
            watch.entries(norm._parameters, "weight", "bias")
            watch.entries(head._parameters, "weight", "bias")
            watch.memory(hw, hb, nw, nb)
    prepared = _PREPARED_MODELS.get(model)
    if (prepared is not None and len(prepared.steps) == len(steps)
            and all(a is b for a, b in zip(prepared.steps, steps))
            and (prepared.head is None if head_operands is None else
                 prepared.head is not None
                 and _same_bound(head_operands, prepared.head, prepared.head_ptrs))):
        prepared.layers, prepared.watch = layers, watch
        return prepared
    prepared = _PREPARED_MODELS[model] = _PreparedModel(tuple(steps), head_operands, layers,
                                                        watch)
    return prepared


def _decode_model(model: DecoderLM, x: Tensor, cache: KVCache) -> Tensor | None:
    """Logits ``(B, 1, vocab)`` of a cached step with one new token per sequence, ``x (B, 1,
    dim)`` its embeddings, as one native call through every block and the output layer; None
    (nothing done) when some block, the cache or the step cannot take the native path (the
    caller then runs the modules). The same results as the blocks' own native steps.

    The checks run in full when the step is bound; later steps confirm through its
    :class:`_Watch` that nothing they read changed (at memory speed, a 6-block step's Python
    time was ~15% of it)."""
    if (not isinstance(cache, _BufferCache) or x.dtype != torch.float32 or not x.is_cpu
            or x.shape[0] * x.shape[1] > native.GEMV_MAX_ROWS or not native.step_available()):
        return None
    b, dim = x.shape[0], x.shape[2]
    prepared = _PREPARED_MODELS.get(model)
    if (prepared is None or _module_mod._global_forward_hooks
            or _module_mod._global_forward_pre_hooks or not prepared.watch.unchanged()):
        prepared = _prepare_model(model, x)
        if prepared is None:
            return None
    caches, ropes, rope_rows = [], [], {}
    for layer, kv_heads, head_dim, pattern, rot in prepared.layers:
        slot = cache._decode_slot(layer, b, kv_heads, head_dim, pattern)
        if slot is None:
            return None
        offset = cache.seq_length(layer)
        rope = None
        if rot is not None:
            # blocks whose tables are the same share one lookup
            key = (rot.head_dim, rot.rotary_dims, rot.base, offset)
            rope = rope_rows.get(key)
            if rope is None:
                rope = rope_rows[key] = rot.cos_sin(offset, offset + 1, x.device, x.dtype)
        caches.append(slot)
        ropes.append(rope)
    x2 = x.reshape(b, dim).contiguous()
    out = x2.new_empty(b, dim)
    logits = None if prepared.head is None else x2.new_empty(b, model.vocab_size)
    prepared.call(x2, out, caches, ropes, logits)
    for layer, *_ in prepared.layers:
        cache._advance(layer, 1)
    if logits is None:
        return model.head(model.norm(out.view(b, 1, dim)))
    return logits.view(b, 1, model.vocab_size)


class _NativeDecoding:
    """One :func:`~attnkit.lm.generate` call's cached steps through the one-call native step
    with its buffers bound once (:meth:`native.PreparedDecodeModel.bind`: the cache buffers,
    the rotary tables, the rows in and out, the embedding, the token ids in and the greedy
    tokens out). A step then confirms that nothing it was bound from changed (the prepared
    model's :class:`_Watch`, its own for the embedding, the cache's buffers and positions),
    writes the new tokens' ids and makes one native call, which embeds them and picks the
    greedy tokens. At a few ms per step, the module path's Python (~0.5-0.8 ms: cache misses
    after the step has streamed the weights through the caches) was 10-15% of the step.

    :meth:`step` returns None whenever it does not run the step (the prompt, the step that
    prepares the model, anything changed, a cache that must grow); the caller then runs the
    model, which handles every case, and the next step binds again."""

    def __init__(self, model: DecoderLM, cache: _BufferCache, rows: int, positions: int):
        self.model, self.cache, self.rows, self.positions = model, cache, rows, positions
        self.bound: native.BoundDecodeStep | None = None
        self.prepared_watch: _Watch | None = None
        self.fresh = False  # the last step was native and nothing ran since (see step)

    def _bind(self) -> bool:
        model, cache, rows = self.model, self.cache, self.rows
        self.bound = None
        prepared = _PREPARED_MODELS.get(model)
        embed = model._modules.get("embed")
        if (prepared is None or prepared.head is None or type(embed) is not nn.Embedding
                or embed.max_norm is not None or _has_hooks(embed)):
            return False
        weight = embed.weight
        if not _bindable(weight) or weight.shape != (model.vocab_size, model.dim):
            return False
        watch = _Watch()
        watch.entries(model._modules, "embed")
        watch.hooks(embed)
        watch.entries(embed.__dict__, "max_norm")
        watch.entries(embed._parameters, "weight")
        watch.memory(weight)
        caches, tables, layers = [], [], []
        cpu = torch.device("cpu")
        for layer, kv_heads, head_dim, pattern, rot in prepared.layers:
            slot = cache._decode_slot(layer, rows, kv_heads, head_dim, pattern)
            if slot is None:
                return False
            caches.append(slot[:2])
            layers.append(layer)
            tables.append(None if rot is None else
                          rot.cos_sin(0, self.positions, cpu, torch.float32))
        self.logits = weight.new_empty(rows, model.vocab_size)
        ids, next_ids = (torch.zeros(rows, dtype=torch.int64) for _ in range(2))
        # the step embeds the ids and picks the greedy tokens itself; Python reads and writes
        # them through ctypes views, with no tensor operation per token (each one costs tens of
        # microseconds after a step has streamed the weights through the caches)
        self.bound = prepared.call.bind(weight.new_empty(rows, model.dim),
                                        weight.new_empty(rows, model.dim), caches, tables,
                                        self.logits, ids=ids, embed=weight, next_ids=next_ids)
        self.ids = (ctypes.c_int64 * rows).from_address(ids.data_ptr())
        self.next_ids = (ctypes.c_int64 * rows).from_address(next_ids.data_ptr())
        self.prepared_watch, self.watch = prepared.watch, watch
        self.layers = layers
        self.keys = [k for k, _ in caches]
        self.values = [v for _, v in caches]
        return True

    def step(self, tokens: list[int], recheck: bool = True) -> Tensor | None:
        """Logits ``(B, vocab)`` of the next position for one new token per sequence,
        ``tokens`` (B ids, checked by the step: ``ValueError`` outside the vocabulary), in a
        buffer the next step reuses, the cache advanced; or None. After it, :meth:`greedy`
        holds the logits' argmax. ``recheck=False``: the caller ran no other code since this
        object's last step, which was native, so nothing it checked can have changed (from this
        thread) and the checks are skipped: ~0.15 ms of cache misses per step."""
        # fresh again only once this step is done: any other way out leaves it unset
        fresh, self.fresh = self.fresh, False
        if len(tokens) != self.rows or torch.is_grad_enabled():
            return None
        cache = self.cache
        if recheck or not fresh:
            prepared = _PREPARED_MODELS.get(self.model)
            if (prepared is None or _module_mod._global_forward_hooks
                    or _module_mod._global_forward_pre_hooks or not prepared.watch.unchanged()):
                return None  # the model's own path checks everything again and prepares anew
            if (self.bound is None or prepared.watch is not self.prepared_watch
                    or not self.watch.unchanged()
                    or not all(map(operator.is_, map(cache._keys.__getitem__, self.layers),
                                   self.keys))
                    or not all(map(operator.is_, map(cache._values.__getitem__, self.layers),
                                   self.values))):
                if not self._bind():
                    return None
        held, seen = cache._held, cache._seen
        pos = held[self.layers[0]]
        if (pos >= self.bound.limit or any(held[i] != pos or seen[i] != pos
                                           for i in self.layers)):
            return None
        self.ids[:] = tokens
        self.bound(pos)
        for i in self.layers:
            cache._advance(i, 1)
        self.fresh = True
        return self.logits

    def greedy(self) -> list[int]:
        """The last :meth:`step`'s greedy tokens, ``logits.argmax(-1)``."""
        return self.next_ids[:]


def _native_decoding(model: nn.Module, cache: KVCache | None, rows: int,
                     positions: int) -> _NativeDecoding | None:
    """A :class:`_NativeDecoding` for ``rows`` sequences of up to ``positions`` positions when
    the model is a :class:`DecoderLM` (exactly), the cache a buffer cache and the native step
    is built; else None."""
    if (type(model) is not DecoderLM or not isinstance(cache, _BufferCache)
            or rows > native.GEMV_MAX_ROWS or not native.step_available()):
        return None
    return _NativeDecoding(model, cache, rows, positions)


class GeluMLP(nn.Sequential):
    """``Linear -> GELU -> Linear`` (an ``nn.Sequential``, so parameter names stay ``0.weight``,
    ``2.weight``...). The first product and the GELU run as one pass of
    :func:`~attnkit.nn.attention.split_linear` (fused in the native decoding GEMV)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(SplitLinear(dim, hidden), nn.GELU(), SplitLinear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        fc1, act, fc2 = self
        if (type(act) is nn.GELU and act.approximate == "none" and type(fc1) is SplitLinear
                and not _has_hooks(fc1, act)):
            return fc2(split_linear(x, fc1.weight, fc1.bias, gelu=True))
        return fc2(act(fc1(x)))  # hooks to run, or the layers were swapped (e.g. pruning)


class DecoderBlock(nn.Module):
    """``x + attn(LN(x))`` then ``x + MLP(LN(x))`` (GELU MLP, hidden ``mlp_ratio * dim``)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None, pattern,
                 mlp_ratio: float, dropout: float, layer_idx: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, num_kv_heads, pattern=pattern,
                                       dropout=dropout, layer_idx=layer_idx)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(mlp_ratio * dim)
        self.mlp = GeluMLP(dim, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None,
                head_mask: Tensor | None = None,
                key_padding_mask: Tensor | None = None) -> Tensor:
        """``x (B, L, dim)`` -> ``(B, L, dim)``; ``cache``, ``head_mask`` and
        ``key_padding_mask`` as in :meth:`SelfAttention.forward`."""
        operands = None if head_mask is not None else self._decode_operands(x)
        if operands is not None:
            # a decoding step: four native GEMV calls (norms and residuals fused in) around
            # the engine's attention; same results, a fraction of the per-step overhead
            return _decode_block(self, operands, x, cache, key_padding_mask)
        drop = self.drop if self.training and self.drop.p > 0 else _identity
        x = x + drop(self.attn(self.norm1(x), cache=cache, head_mask=head_mask,
                               key_padding_mask=key_padding_mask))
        return x + drop(self.mlp(self.norm2(x)))

    def _decode_ready(self, x: Tensor) -> bool:
        """Whether this call can take the native decoding path (see :meth:`_decode_operands`)."""
        return self._decode_operands(x) is not None

    def _decode_operands(self, x: Tensor, watch: _Watch | None = None) -> tuple | None:
        """The tensors of the native decoding path when this call can take it, else None:
        inference without autograd, fp32 on CPU, at most ``GEMV_MAX_ROWS`` rows, the block's
        own layer types (nothing swapped in, no hooks to run) with contiguous fp32 CPU
        weights. Returns the q/k/v weights and biases, the first LayerNorm's weight and bias,
        the output projection's weight and bias, the second LayerNorm's, the MLP layers', and
        the two LayerNorm eps.

        Runs on every decoding step of every block, so it reads the module dictionaries
        directly (``nn.Module.__getattr__`` alone would cost more than the step it saves).
        With ``watch``, what the checks read is recorded there (see :class:`_Watch`)."""
        if (self.training or torch.is_grad_enabled() or x.dtype != torch.float32
                or not x.is_cpu or x.shape[0] * x.shape[1] > native.GEMV_MAX_ROWS):
            return None
        mods = self._modules
        attn, mlp, norm1, norm2 = mods["attn"], mods["mlp"], mods["norm1"], mods["norm2"]
        if (type(attn) is not SelfAttention or type(mlp) is not GeluMLP
                or type(norm1) is not nn.LayerNorm or type(norm2) is not nn.LayerNorm):
            return None
        am, mm = attn._modules, mlp._modules
        rot = am.get("rotary")
        if len(mm) != 3 or (rot is not None and rot.rotary_dims != rot.head_dim):
            return None
        fc1, act, fc2 = mm.values()
        if type(act) is not nn.GELU or act.approximate != "none":
            return None
        q, k, v, o = am["q_proj"], am["k_proj"], am["v_proj"], am["out_proj"]
        linears = (q, k, v, o, fc1, fc2)
        for m in linears:
            if type(m) is not SplitLinear and type(m) is not nn.Linear:
                return None
        if _has_hooks(norm1, norm2, attn, mlp, act, *linears):
            return None
        if watch is not None:
            watch.hooks(self, norm1, norm2, attn, mlp, act, *linears)
            watch.entries(self.__dict__, "training")
            watch.entries(mods, "attn", "mlp", "norm1", "norm2")
            watch.entries(am, "rotary", "q_proj", "k_proj", "v_proj", "out_proj")
            watch.entries(mm, *mm.keys())
            watch.size(mm)
            watch.entries(act.__dict__, "approximate")
            watch.entries(norm1.__dict__, "eps")
            watch.entries(norm2.__dict__, "eps")
            if rot is not None:
                watch.entries(rot.__dict__, "rotary_dims", "head_dim")
            for m in (q, k, v, norm1, o, norm2, fc1, fc2):
                watch.entries(m._parameters, "weight", "bias")
        p = [m._parameters for m in (q, k, v, norm1, o, norm2, fc1, fc2)]
        tensors = (p[0]["weight"], p[1]["weight"], p[2]["weight"], p[0]["bias"], p[1]["bias"],
                   p[2]["bias"], p[3]["weight"], p[3]["bias"], p[4]["weight"], p[4]["bias"],
                   p[5]["weight"], p[5]["bias"], p[6]["weight"], p[6]["bias"], p[7]["weight"],
                   p[7]["bias"])
        if not _bindable(*tensors) or not native.gemv_available():
            return None
        if watch is not None:
            watch.memory(*tensors)
        return (*tensors, norm1.eps, norm2.eps)


def _onto_huge_pages(model: nn.Module) -> None:
    """Move the model's CPU parameters into memory on huge pages where the system grants them
    (:func:`native.huge_page_empty`; values, shapes, parameter objects and ties unchanged).
    A cached decoding step streams every weight from memory, and on 4 KiB pages the stream
    runs slower (measured: the one-call step ~7-14% faster with the weights moved). Done once,
    at construction, before anything else can hold the old memory; weights that get new
    memory later (``.to(dtype)``, ``load_state_dict(assign=True)``) are only collapsed onto
    huge pages as far as their addresses allow when a step binds them."""
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in model.parameters():  # each parameter once: a tied weight is not listed twice
        if p.is_cpu and p.is_contiguous():
            by_dtype.setdefault(p.dtype, []).append(p)
    with torch.no_grad():
        for dtype, params in by_dtype.items():
            for p, new in zip(params, native.huge_page_empty([p.shape for p in params], dtype)):
                new.copy_(p)
                p.data = new


class DecoderLM(nn.Module):
    """Decoder-only transformer: token embedding, ``depth`` pre-LN blocks with rotary causal
    self-attention, a final LayerNorm and an output layer tied to the embedding.

    Args:
        vocab_size: number of token ids.
        dim, depth, num_heads: width, blocks, query heads per block.
        num_kv_heads: key/value heads (``num_heads``: multi-head; ``1``: multi-query).
        max_seq_len: longest sequence (prompt + generated) the model accepts.
        window: if set, attention is ``causal() & sliding_window(window)`` (each position sees
            itself and the ``window`` previous ones), servable by a ``SlidingWindowCache``.
        mlp_ratio, dropout: MLP width factor and dropout probability.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        max_seq_len: int = 4096,
        *,
        window: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        for name, val in (("vocab_size", vocab_size), ("dim", dim), ("depth", depth),
                          ("num_heads", num_heads), ("max_seq_len", max_seq_len)):
            check_positive_int(name, val)
        check_positive_int("window", window, optional=True)
        self.vocab_size, self.dim, self.depth = vocab_size, dim, depth
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.max_seq_len, self.window = max_seq_len, window
        self.mlp_ratio = mlp_ratio
        pattern = causal() if window is None else causal() & sliding_window(window)
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, num_heads, num_kv_heads, pattern, mlp_ratio, dropout, i)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = SplitLinear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.apply(self._init)
        _onto_huge_pages(self)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def check_ids(self, ids: Tensor, offset: int = 0) -> None:
        """Raise ``ValueError`` unless ``ids`` is a non-empty ``(B, L)`` integer tensor of valid
        token ids that fits in ``max_seq_len`` after ``offset`` cached positions."""
        if not isinstance(ids, Tensor):
            raise TypeError(f"token ids must be a tensor, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise ValueError(f"token ids must be an integer tensor, got {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"token ids must have shape (B, L), got {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError(f"token ids must be non-empty, got shape {tuple(ids.shape)}")
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {self.vocab_size}), got values in [{lo}, {hi}]"
            )
        if offset + ids.shape[1] > self.max_seq_len:
            raise ValueError(
                f"sequence of {offset + ids.shape[1]} positions ({offset} cached + "
                f"{ids.shape[1]} new) exceeds max_seq_len={self.max_seq_len}"
            )

    def forward(
        self,
        ids: Tensor,
        *,
        cache: KVCache | None = None,
        head_mask: Tensor | Sequence[Tensor] | None = None,
        last_only: bool = False,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Next-token logits.

        Args:
            ids: ``(B, L)`` token ids; with a cache, the positions after the cached ones.
            cache: a :class:`attnkit.lm.KVCache`, updated in place.
            head_mask: per-head output gates (see :class:`SelfAttention`): a
                ``(depth, num_heads)`` tensor, or one ``(num_heads_i,)`` tensor per block (for
                blocks with different head counts, e.g. after pruning).
            last_only: return logits for the last position only (decoding).
            attention_mask: ``(B, S)`` with 1 (or True) for real tokens and 0 for padding, as
                in Hugging Face, over every position so far (``S`` = cached + ``L``): padded
                positions are never attended to (for left-padded batches; their own logits
                mean nothing). Rotary attention depends only on relative positions, so a row
                shifted right by its padding gives the same logits as alone, up to rounding.

        Returns:
            ``(B, L, vocab_size)``, or ``(B, 1, vocab_size)`` with ``last_only``.
        """
        offset = 0 if cache is None else cache.seq_length(0)
        self.check_ids(ids, offset)
        if head_mask is not None and len(head_mask) != self.depth:
            raise ValueError(
                f"head_mask must hold one (num_heads,) gate per block: {self.depth}, "
                f"got {len(head_mask)}"
            )
        pad = self._padding(attention_mask, ids.shape[0], offset + ids.shape[1])
        x = self.embed(ids)
        if (cache is not None and ids.shape[1] == 1 and head_mask is None and pad is None
                and not self.training and not torch.is_grad_enabled()):
            # a cached step of one new token per sequence: every block and the output layer
            # in one native call where they all can take it
            logits = _decode_model(self, x, cache)
            if logits is not None:
                return logits
        for i, block in enumerate(self.blocks):
            x = block(x, cache, None if head_mask is None else head_mask[i], pad)
        if last_only:
            x = x[:, -1:]
        return self.head(self.norm(x))

    @staticmethod
    def _padding(attention_mask: Tensor | None, batch: int, positions: int) -> Tensor | None:
        """``attention_mask`` (1 = token) -> the layers' ``key_padding_mask`` (True = pad)."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor):
            raise TypeError(
                f"attention_mask must be a tensor, got {type(attention_mask).__name__}"
            )
        if attention_mask.shape != (batch, positions):
            raise ValueError(
                f"attention_mask must have shape (B, cached + L) = ({batch}, {positions}), "
                f"got {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype != torch.bool and not bool(
                ((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        return attention_mask == 0

    def config(self) -> dict:
        """Constructor arguments (to rebuild the architecture)."""
        return {"vocab_size": self.vocab_size, "dim": self.dim, "depth": self.depth,
                "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                "max_seq_len": self.max_seq_len, "window": self.window,
                "mlp_ratio": self.mlp_ratio}
