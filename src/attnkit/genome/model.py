"""A transformer over single bases whose attention is any pattern from :mod:`attnkit.patterns`.

The default pattern is a local window, keys at exponentially growing distances, and a few global
hub tokens: ``sliding_window(w) | exponential() | global_tokens(hubs)``, about
``2w + 2 log2(L) + hubs`` keys per base, so cost grows near-linearly with genome length. All
attention goes through :func:`attnkit.attention` (no kernel of its own).

Whole-genome inference (:meth:`GenomeEncoder.embed_genome`) streams layer by layer without
autograd: position-wise parts (stem, layer norm, projections, rotary tables, MLP) run in
cache-sized chunks of positions and write into preallocated buffers, so the peak holds ``x``,
``q``, ``k``, ``v`` and the attention output (``5 * L * dim`` floats) plus the engine's bounded
chunk workspace, and the per-base cost of the position-wise parts does not grow with ``L``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnkit
from attnkit import patterns as P
from attnkit.checks import check_positive_int
from attnkit.nn.attention import SelfAttention
from attnkit.patterns import Pattern

from .fasta import BASES, VOCAB_SIZE

__all__ = ["GenomePattern", "GenomeEncoder", "PatternSpec"]

#: A fixed pattern, a function ``length -> pattern`` (hubs depend on the length), or ``None``
#: for dense attention.
PatternSpec = Pattern | Callable[[int], Pattern] | None

#: Bytes of the widest per-chunk temporary (the MLP's hidden layer) in
#: :meth:`GenomeEncoder.embed_genome` by default: about a core's L2 and far under glibc's mmap
#: threshold, so every chunk reuses the same warm memory. Chunks of 65536 positions (a 32 MiB
#: hidden layer at dim 32) took fresh pages for every chunk and made the per-base cost grow
#: from 64k to 1M bases.
STREAM_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class GenomePattern:
    """``length -> pattern``: window ``w`` | exponential (optional) | global hub tokens.

    ``hubs`` is a count (hubs at the centres of equal segments of the sequence) or explicit
    positions (for example known promoters). ``hubs=0`` means no global tokens.
    """

    window: int = 128
    exponential: bool = True
    hubs: int | tuple[int, ...] = 8

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be an int >= 0, got {self.window!r}")
        if isinstance(self.hubs, int):
            if isinstance(self.hubs, bool) or self.hubs < 0:
                raise ValueError(f"hubs must be a count >= 0 or positions, got {self.hubs!r}")
        else:
            object.__setattr__(self, "hubs", tuple(int(h) for h in self.hubs))
            if any(h < 0 for h in self.hubs):
                raise ValueError(f"hub positions must be >= 0, got {self.hubs}")

    def hub_positions(self, length: int) -> Tensor:
        """``(num_hubs,)`` int64 hub positions for a sequence of ``length`` bases."""
        if isinstance(self.hubs, int):
            n = min(self.hubs, length)
            return ((torch.arange(n, dtype=torch.float64) + 0.5) * length / max(n, 1)).long()
        pos = torch.tensor(self.hubs, dtype=torch.long)
        if pos.numel() and int(pos.max()) >= length:
            raise ValueError(f"hub position {int(pos.max())} is outside a sequence of {length}")
        return pos

    def __call__(self, length: int) -> Pattern:
        pat = P.sliding_window(self.window)
        if self.exponential:
            pat = pat | P.exponential()
        hubs = self.hub_positions(length)
        if hubs.numel():
            pat = pat | P.global_tokens(hubs)
        return pat


def _resolve(spec: PatternSpec, length: int) -> Pattern | None:
    if spec is None or isinstance(spec, Pattern):
        return spec
    return spec(length)


def _rope_tables(attn: SelfAttention, start: int, end: int, device, dtype
                 ) -> tuple[Tensor, Tensor] | None:
    """Rotary tables for positions ``start..end-1``, computed once per call and shared by
    every block (the layers' rotary embeddings are identical), or None without rotation."""
    if attn.rotary is None:
        return None
    return attn.rotary.tables(start, end, device, dtype)


class GenomeBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ff_mult: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        # rotary on the first half of each head's channels: the unrotated rest lets content
        # match across thousands of bases without phase drift
        head_dim = dim // num_heads
        self.attn = SelfAttention(dim, num_heads, qkv_bias=True, rope=True,
                                  rotary_dims=2 * (head_dim // 4))
        self.norm2 = nn.LayerNorm(dim)
        hidden = ff_mult * dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, pattern: Pattern | None,
                rope: tuple[Tensor, Tensor] | None, bias: Tensor | None,
                attend: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """``bias``: the engine's bias (additive, or a bool keep-mask); ``attend(q, k, v)``
        replaces the engine call (the sequence-parallel mode)."""
        q, k, v = self.attn.qkv(self.norm1(x), rope_tables=rope)
        # (B, H, L, Dh) views of (B, L, H*Dh) projections interleave the heads: every shifted
        # slice the engine reads per offset of the pattern (window, exponential) would then
        # stride over all heads' channels, which at 10^5-10^6 bases leaves the cache and made
        # the model's window + exponential + global cost grow faster than the engine's. One
        # linear copy into head-major layout keeps each head's rows adjacent.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if attend is None:
            a = attnkit.attention(q, k, v, pattern=pattern, bias=bias)  # (B, H, L, Dh)
        else:
            a = attend(q, k, v)
        x = x + self.attn.merge(a)
        return x + self.mlp(self.norm2(x))

    @torch.no_grad()
    def stream_(self, x: Tensor, pattern: Pattern | None, chunk: int, *,
                qkv: Tensor | None = None) -> Tensor:
        """In-place inference update of ``x (B, L, dim)``, position-wise work in chunks of
        ``chunk`` positions. ``qkv``: an optional ``(3, B, heads, L, head_dim)`` buffer to
        write the heads into (reused across blocks)."""
        b, n, dim = x.shape
        h, dh = self.attn.num_heads, self.attn.head_dim
        if qkv is None:
            qkv = x.new_empty(3, b, h, n, dh)
        # The engine would form q * scale as one full-length copy (fresh pages at every call
        # once L * dim floats pass the allocator's mmap threshold); the same product formed
        # chunk by chunk, while q is in cache, and scale=1.0 give the same numbers.
        scale = 1.0 / math.sqrt(dh)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            # rotary tables per chunk: whole-length tables are float64 temporaries of
            # several times L * rotary_dims values that leave the cache at 10^6 bases
            rope = _rope_tables(self.attn, s, e, x.device, x.dtype)
            q, k, v = self.attn.qkv(self.norm1(x[:, s:e]), rope_tables=rope)
            qkv[0, :, :, s:e] = q * scale
            qkv[1, :, :, s:e] = k
            qkv[2, :, :, s:e] = v
        a = attnkit.attention(qkv[0], qkv[1], qkv[2], pattern=pattern, scale=1.0)
        for s in range(0, n, chunk):  # merge and MLP in one pass while the chunk is in cache
            e = min(n, s + chunk)
            xs = x[:, s:e]
            xs += self.attn.merge(a[:, :, s:e])
            xs += self.mlp(self.norm2(xs))
        return x


class GenomeEncoder(nn.Module):
    """Transformer over single-base tokens with a sparse attention pattern.

    Args:
        dim, depth, num_heads: width, number of blocks, heads (``dim % num_heads == 0``).
        pattern: a pattern, a ``length -> pattern`` function (default
            ``GenomePattern(window=128, exponential=True, hubs=8)``), or ``None`` (dense).
        num_labels: classes of the per-position label head.
        stem_kernel: width of the convolutional stem that mixes neighbouring bases (odd).
        ff_mult: MLP width multiplier.

    Tokens are ``(B, L)`` int64 from :func:`attnkit.genome.encode` (0..3 bases, 4 = N,
    5 = MASK). :meth:`forward` gives hidden states ``(B, L, dim)``; :meth:`mlm_logits` gives
    ``(B, L, 4)`` base logits and :meth:`label_logits` ``(B, L, num_labels)``.
    """

    def __init__(
        self,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        pattern: PatternSpec = GenomePattern(),  # noqa: B008 (frozen dataclass: immutable)
        *,
        num_labels: int = 2,
        stem_kernel: int = 9,
        ff_mult: int = 4,
    ):
        super().__init__()
        for name, val in (("dim", dim), ("depth", depth), ("num_heads", num_heads),
                          ("num_labels", num_labels), ("ff_mult", ff_mult)):
            check_positive_int(name, val)
        if not isinstance(stem_kernel, int) or stem_kernel < 1 or stem_kernel % 2 == 0:
            raise ValueError(f"stem_kernel must be a positive odd int, got {stem_kernel!r}")
        if not (pattern is None or isinstance(pattern, Pattern) or callable(pattern)):
            raise TypeError("pattern must be a Pattern, a function length -> Pattern, or None")
        self.pattern = pattern
        self.config = dict(dim=dim, depth=depth, num_heads=num_heads, num_labels=num_labels,
                           stem_kernel=stem_kernel, ff_mult=ff_mult)
        self.embed = nn.Embedding(VOCAB_SIZE, dim)
        # Marks the pattern's global hub tokens (as BigBird/Longformer mark global tokens), so
        # queries can find hubs by content from the first step.
        self.hub_embed = nn.Parameter(torch.randn(dim))
        self.stem = nn.Conv1d(dim, dim, stem_kernel, padding=stem_kernel // 2)
        self.blocks = nn.ModuleList(GenomeBlock(dim, num_heads, ff_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.mlm_head = nn.Linear(dim, len(BASES))
        self.label_head = nn.Linear(dim, num_labels)

    def _check_tokens(self, tokens: Tensor, dims: int) -> None:
        if not isinstance(tokens, Tensor) or tokens.dtype != torch.long or tokens.dim() != dims:
            shape = "(B, L)" if dims == 2 else "(L,)"
            got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an int64 tensor of shape {shape}, got {got}")
        if tokens.shape[-1] == 0:
            raise ValueError("tokens must hold at least one base")
        if int(tokens.min()) < 0 or int(tokens.max()) >= VOCAB_SIZE:
            raise ValueError(f"tokens must be in [0, {VOCAB_SIZE}) (see attnkit.genome.encode)")

    def _stem(self, tokens: Tensor) -> Tensor:
        e = self.embed(tokens).transpose(1, 2)  # (B, dim, L)
        return F.gelu(self.stem(e)).transpose(1, 2).contiguous() + self.embed(tokens)

    def forward(self, tokens: Tensor, *, attn_mask: Tensor | None = None,
                dense_reference: bool = False, sequence_parallel: bool = False,
                group=None) -> Tensor:
        """``tokens (B, L)`` -> hidden ``(B, L, dim)``.

        ``attn_mask``: optional ``(L, L)`` mask applied on top of the pattern, as in
        :class:`torch.nn.MultiheadAttention`: bool True = not allowed, or a float additive
        bias. ``dense_reference=True`` computes the same function densely: attention
        over all keys with the pattern's ``(L, L)`` mask as a bias (O(L^2); for tests).

        ``sequence_parallel=True`` (inside a ``torch.distributed`` process group ``group``,
        default the world): ``tokens (B, L_local)`` is this rank's shard of a sequence of ``L``
        bases (:func:`attnkit.distributed.shard_bounds`) and the result is the same shard
        ``(B, L_local, dim)`` of the single-process output; attention runs through
        :func:`attnkit.distributed.sequence_parallel_attention`. Every rank must call it.
        """
        if sequence_parallel:
            if attn_mask is not None or dense_reference:
                raise ValueError("sequence_parallel=True does not take attn_mask or "
                                 "dense_reference")
            return self._forward_sharded(tokens, group)
        self._check_tokens(tokens, 2)
        n = tokens.shape[1]
        pattern = _resolve(self.pattern, n)
        # the engine's boolean bias is a keep-mask (as SDPA's attn_mask)
        bias = attn_mask
        if isinstance(attn_mask, Tensor) and attn_mask.dtype == torch.bool:
            bias = ~attn_mask
        if dense_reference and pattern is not None:
            keep = pattern.to_dense(n, n, device=tokens.device)
            if bias is None:
                bias = keep
            elif bias.dtype == torch.bool:
                bias = bias & keep
            else:
                bias = bias.masked_fill(~keep, float("-inf"))
            pattern = None
        x = self._stem(tokens)
        hubs = self.hub_positions(n).to(x.device)
        if hubs.numel():
            x = x.index_add(1, hubs, self.hub_embed.expand(x.shape[0], hubs.numel(), -1))
        rope = _rope_tables(self.blocks[0].attn, 0, n, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, pattern, rope, bias)
        return self.norm(x)

    def _forward_sharded(self, tokens: Tensor, group) -> Tensor:
        from attnkit.distributed.sequence import (
            halo_exchange,
            sequence_layout,
            sequence_parallel_attention,
        )

        try:  # a bad shard on one rank makes every rank raise, instead of the others waiting
            self._check_tokens(tokens, 2)
            error = ""
        except ValueError as e:
            error = str(e)
        length = tokens.shape[-1] if isinstance(tokens, Tensor) and tokens.dim() else 0
        n, start, stop = sequence_layout(length, group, local_error=error)
        pattern = _resolve(self.pattern, n)
        if pattern is None:
            raise ValueError("sequence_parallel=True needs a sparse pattern (dense attention "
                             "would need the whole sequence on every rank)")
        half = self.config["stem_kernel"] // 2  # the stem sees `half` bases on each side
        ext, left = halo_exchange(tokens, half, half, group, dim=1)
        x = self._stem(ext)[:, left:left + tokens.shape[1]]
        hubs = self.hub_positions(n).to(x.device)
        hubs = hubs[(hubs >= start) & (hubs < stop)] - start
        if hubs.numel():
            x = x.index_add(1, hubs, self.hub_embed.expand(x.shape[0], hubs.numel(), -1))
        rope = _rope_tables(self.blocks[0].attn, start, stop, x.device, x.dtype)

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return sequence_parallel_attention(q, k, v, pattern, group)

        for block in self.blocks:
            x = block(x, None, rope, None, attend=attend)
        return self.norm(x)

    def stream_chunk(self) -> int:
        """Positions per chunk of :meth:`embed_genome`'s position-wise work by default: the
        MLP's hidden activations of a chunk fill about :data:`STREAM_CHUNK_BYTES`."""
        hidden = self.config["ff_mult"] * self.config["dim"] * self.embed.weight.element_size()
        return max(256, STREAM_CHUNK_BYTES // hidden)

    @torch.no_grad()
    def embed_genome(self, tokens: Tensor, *, chunk_size: int | None = None) -> Tensor:
        """Hidden states ``(L, dim)`` of a whole genome ``tokens (L,)`` in one call, streaming
        through the layers (no autograd; position-wise work in chunks of ``chunk_size``
        positions, default :meth:`stream_chunk`). Equals :meth:`forward` up to rounding."""
        self._check_tokens(tokens, 1)
        if chunk_size is None:
            chunk_size = self.stream_chunk()
        check_positive_int("chunk_size", chunk_size)
        n = tokens.numel()
        pattern = _resolve(self.pattern, n)
        dim = self.config["dim"]
        x = torch.empty(1, n, dim, device=tokens.device, dtype=self.embed.weight.dtype)
        half = self.config["stem_kernel"] // 2
        for s in range(0, n, chunk_size):  # the stem with a halo of `half` bases each side
            e = min(n, s + chunk_size)
            lo, hi = max(0, s - half), min(n, e + half)
            x[:, s:e] = self._stem(tokens[None, lo:hi])[:, s - lo : s - lo + (e - s)]
        hubs = self.hub_positions(n).to(x.device)
        if hubs.numel():
            x[:, hubs] += self.hub_embed
        attn = self.blocks[0].attn
        qkv = x.new_empty(3, 1, attn.num_heads, n, attn.head_dim)  # shared by the blocks
        for block in self.blocks:
            block.stream_(x, pattern, chunk_size, qkv=qkv)
        del qkv
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            x[:, s:e] = self.norm(x[:, s:e])
        return x[0]

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """``(..., dim)`` -> ``(..., 4)`` logits over A, C, G, T."""
        return self.mlm_head(hidden)

    def label_logits(self, hidden: Tensor) -> Tensor:
        """``(..., dim)`` -> ``(..., num_labels)``."""
        return self.label_head(hidden)

    def hub_positions(self, length: int) -> Tensor:
        """Hub positions the pattern uses for a sequence of ``length`` (empty if none)."""
        if isinstance(self.pattern, GenomePattern):
            return self.pattern.hub_positions(length)
        return torch.zeros(0, dtype=torch.long)


def attention_pairs(pattern: PatternSpec, length: int) -> int:
    """Allowed (query, key) pairs of ``pattern`` at ``length`` (``length**2`` when dense)."""
    pat = _resolve(pattern, length)
    return length * length if pat is None else pat.nnz(length, length)

