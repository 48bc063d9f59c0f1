"""Four ways to fuse an audio stream with a text sequence, with matched parameter counts and no
alignment prior in any of them.

All four share the same encoders: audio frames ``(B, La, 13)`` go through three 1-D
convolutions (two of stride 2 by default: one position per 4 frames, a receptive field of 29
frames, about one spoken digit; O(La)) plus a sinusoidal encoding of the *position index*;
text tokens ``(B, Lt)`` get an embedding plus the same encoding of the *token index*. Each
modality's positions are its own: nothing tells a model which frames belong to which token (the
digits sit at random offsets), so alignment has to be found from content.

- :class:`CrossModalFusion`: text queries attend over the audio frames (cross-attention, cost
  O(Lt * La)), then one self-attention layer over the text tokens (so tokens can compare what
  they found, e.g. its order), then a per-token head.
- :class:`EarlyFusion`: the two sequences are concatenated (with a modality embedding) and two
  self-attention layers run over both (cost O((Lt + La)^2)), then the same head on the text
  positions.
- :class:`LateFusion` with ``pool="attention"``: each modality is pooled by attention (a few
  learned queries per modality), the pooled vectors are concatenated and fed to an MLP; with
  ``pool="mean"``: mean pooling instead.

Each outputs one logit per example (text matches audio).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..nn.cross import CrossAttention
from .data import N_DIGITS, N_MFCC

__all__ = [
    "FusionModel",
    "CrossModalFusion",
    "EarlyFusion",
    "LateFusion",
    "count_parameters",
    "matched_models",
    "MODEL_NAMES",
]

#: The four fusions, as named in the experiment's metrics.
MODEL_NAMES = ("cross", "early_concat", "late_attnpool", "late_concat")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _sinusoid(length: int, dim: int, device, dtype) -> Tensor:
    """``(length, dim)`` sinusoidal encoding of the indices ``0..length-1`` (Vaswani et al.)."""
    pos = torch.arange(length, device=device, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float64)
                     * (-math.log(10_000.0) / dim))
    enc = torch.zeros(length, dim, device=device, dtype=torch.float64)
    enc[:, 0::2] = torch.sin(pos * freq)
    enc[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return enc.to(dtype)


class FusionModel(nn.Module):
    """Shared encoders and input checks; subclasses implement :meth:`fuse`.

    Args:
        dim: model width (even).
        max_audio_len, max_text_len: longest inputs accepted (longer raise ``ValueError``).
        stride: the audio encoder's total downsampling (1, 2 or 4; two stride-2 convolutions
            for 4): a fused audio position then covers ``stride`` frames and the encoder's
            receptive field (29 frames at 4) spans a whole spoken digit, so each position can
            say which digit it hears; the fusions see ``ceil(La / stride)`` audio positions.
    """

    def __init__(self, dim: int = 32, max_audio_len: int = 8192, max_text_len: int = 16,
                 stride: int = 4):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even int >= 2, got {dim!r}")
        if stride not in (1, 2, 4):
            raise ValueError(f"stride must be 1, 2 or 4, got {stride!r}")
        self.dim, self.max_audio_len, self.max_text_len = dim, max_audio_len, max_text_len
        self.stride = stride
        s1, s2 = (1, 1) if stride == 1 else (1, 2) if stride == 2 else (2, 2)
        self.audio_conv = nn.Sequential(
            nn.Conv1d(N_MFCC, dim, 5, padding=2), nn.GELU(),
            nn.Conv1d(dim, dim, 5, stride=s1, padding=2), nn.GELU(),
            nn.Conv1d(dim, dim, 5, stride=s2, padding=2),
        )
        self.token = nn.Embedding(N_DIGITS, dim)

    def check_inputs(self, audio: Tensor, audio_mask: Tensor | None, text: Tensor) -> Tensor:
        """Validate; returns the ``(B, La)`` bool mask (True = real frame; all True when None)."""
        if not isinstance(audio, Tensor) or audio.dim() != 3 or audio.shape[-1] != N_MFCC:
            got = tuple(audio.shape) if isinstance(audio, Tensor) else type(audio).__name__
            raise ValueError(f"audio must have shape (B, La, {N_MFCC}), got {got}")
        if not isinstance(text, Tensor) or text.dim() != 2:
            got = tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__
            raise ValueError(f"text must have shape (B, Lt) of digit tokens, got {got}")
        if audio.shape[0] != text.shape[0]:
            raise ValueError(
                f"audio and text batch sizes differ: {audio.shape[0]} and {text.shape[0]}"
            )
        if audio.shape[1] > self.max_audio_len:
            raise ValueError(f"audio length {audio.shape[1]} exceeds max_audio_len="
                             f"{self.max_audio_len}")
        if text.shape[1] > self.max_text_len or text.shape[1] == 0:
            raise ValueError(f"text length must be in [1, {self.max_text_len}], got "
                             f"{text.shape[1]}")
        if text.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"text must hold integer tokens, got {text.dtype}")
        if bool(((text < 0) | (text >= N_DIGITS)).any()):
            raise ValueError(f"text tokens must be digits in [0, {N_DIGITS})")
        if not bool(torch.isfinite(audio).all()):
            raise ValueError("audio contains NaN or infinite values")
        if audio_mask is None:
            return torch.ones(audio.shape[:2], dtype=torch.bool, device=audio.device)
        if audio_mask.dtype != torch.bool or tuple(audio_mask.shape) != tuple(audio.shape[:2]):
            raise ValueError(f"audio_mask must be a bool tensor of shape (B, La) = "
                             f"{tuple(audio.shape[:2])}, got {audio_mask.dtype} "
                             f"{tuple(audio_mask.shape)}")
        if not bool(audio_mask.any(1).all()):
            raise ValueError("every audio stream needs at least one unmasked frame")
        return audio_mask

    def encode(self, audio: Tensor, mask: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The audio mask at the encoder's rate ``(B, La')`` (``La' = ceil(La / stride)``; a
        position is real when any of its frames is), ``(B, La', dim)`` audio and
        ``(B, Lt, dim)`` text features (each with its own index encoding)."""
        a = self.audio_conv((audio * mask.unsqueeze(-1)).transpose(1, 2)).transpose(1, 2)
        if self.stride > 1:
            mask = nn.functional.max_pool1d(mask[:, None].to(a.dtype), self.stride,
                                            self.stride, ceil_mode=True)[:, 0] > 0
        a = a + _sinusoid(a.shape[1], self.dim, audio.device, a.dtype)
        t = self.token(text)
        t = t + _sinusoid(text.shape[1], self.dim, t.device, t.dtype)
        return mask, a, t

    def forward(self, audio: Tensor, text: Tensor, audio_mask: Tensor | None = None) -> Tensor:
        """``audio (B, La, 13)``, ``text (B, Lt)`` digit tokens, ``audio_mask (B, La)`` bool
        (True = real frame) -> ``(B,)`` logits that the text names the spoken digits in order."""
        mask = self.check_inputs(audio, audio_mask, text)
        return self.fuse(*self.encode(audio, mask, text))

    def fuse(self, mask: Tensor, a: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError


class _Block(nn.Module):
    """Pre-norm attention + feed-forward, both residual: ``x + attn(norm(x), context)`` then
    ``x + ff(norm(x))``."""

    def __init__(self, dim: int, heads: int, max_context_len: int | None = None,
                 cross: bool = False):
        super().__init__()
        self.norm_q, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim)
        # a self-attention block has no separate context to normalise (an unused parameter
        # would also break DistributedDataParallel)
        self.norm_kv = nn.LayerNorm(dim) if cross else None
        self.attn = CrossAttention(dim, dim, heads, max_context_len=max_context_len)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, context: Tensor | None = None,
                key_padding_mask: Tensor | None = None) -> Tensor:
        q = self.norm_q(x)
        if (context is None) != (self.norm_kv is None):
            raise ValueError("a cross block needs a context; a self block takes none")
        kv = q if context is None else self.norm_kv(context)
        x = x + self.attn(q, kv, key_padding_mask=key_padding_mask)
        return x + self.ff(self.norm_ff(x))


class _TokenHead(nn.Module):
    """Per text token: a match logit from an MLP over ``[t, f, t * f]`` (token features ``t``,
    fused features ``f``); the example matches when every token does, so the logits combine
    by a soft minimum, ``-logsumexp(-m_i)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3 * dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, t: Tensor, fused: Tensor) -> Tensor:
        m = self.mlp(torch.cat([t, fused, t * fused], -1)).squeeze(-1)
        return -torch.logsumexp(-m, dim=1)


class CrossModalFusion(FusionModel):
    """Text queries attend over audio keys/values (padding-masked), then self-attention over
    the text tokens, then a per-token head."""

    def __init__(self, dim: int = 32, heads: int = 2, hidden: int = 64, **kw):
        super().__init__(dim, **kw)
        self.cross = _Block(dim, heads, max_context_len=self.max_audio_len, cross=True)
        self.self_text = _Block(dim, heads)
        self.head = _TokenHead(dim, hidden)

    def fuse(self, mask: Tensor, a: Tensor, t: Tensor) -> Tensor:
        x = self.cross(t, a, key_padding_mask=~mask)
        return self.head(t, self.self_text(x))

    def attention_weights(self, audio: Tensor, text: Tensor, audio_mask: Tensor | None = None):
        """``(B, H, Lt, La')`` cross-attention weights (which audio positions, ``stride``
        frames each, each text token reads)."""
        mask = self.check_inputs(audio, audio_mask, text)
        mask, a, t = self.encode(audio, mask, text)
        blk = self.cross
        return blk.attn(blk.norm_q(t), blk.norm_kv(a), key_padding_mask=~mask,
                        return_weights=True)[1]


class EarlyFusion(FusionModel):
    """Concatenate text and audio (with modality embeddings); two self-attention layers over
    both; the head reads the text positions."""

    def __init__(self, dim: int = 32, heads: int = 2, hidden: int = 64, **kw):
        super().__init__(dim, **kw)
        self.modality = nn.Parameter(torch.zeros(2, dim))
        self.layers = nn.ModuleList([_Block(dim, heads), _Block(dim, heads)])
        self.head = _TokenHead(dim, hidden)

    def fuse(self, mask: Tensor, a: Tensor, t: Tensor) -> Tensor:
        lt = t.shape[1]
        x = torch.cat([t + self.modality[0], a + self.modality[1]], 1)
        pad = ~torch.cat([mask.new_ones(mask.shape[0], lt), mask], 1)
        for layer in self.layers:
            x = layer(x, key_padding_mask=pad)
        return self.head(t, x[:, :lt])


class LateFusion(FusionModel):
    """Pool each modality to a vector (``pool="attention"``: ``num_queries`` learned queries
    per modality attend over it; ``"mean"``: masked mean), concatenate, MLP."""

    def __init__(self, dim: int = 32, hidden: int = 64, pool: str = "mean", heads: int = 2,
                 num_queries: int = 4, **kw):
        super().__init__(dim, **kw)
        if pool not in ("mean", "attention"):
            raise ValueError(f"pool must be 'mean' or 'attention', got {pool!r}")
        self.pool = pool
        width = 2 * dim
        if pool == "attention":
            self.queries = nn.Parameter(torch.randn(2, num_queries, dim) / math.sqrt(dim))
            self.pool_audio = CrossAttention(dim, dim, heads, max_context_len=self.max_audio_len)
            self.pool_text = CrossAttention(dim, dim, heads)
            width = 2 * num_queries * dim
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, 1),
        )

    def fuse(self, mask: Tensor, a: Tensor, t: Tensor) -> Tensor:
        B = a.shape[0]
        if self.pool == "attention":
            qa = self.queries[0].expand(B, -1, -1)
            qt = self.queries[1].expand(B, -1, -1)
            pa = self.pool_audio(qa, a, key_padding_mask=~mask).reshape(B, -1)
            pt = self.pool_text(qt, t).reshape(B, -1)
            return self.mlp(torch.cat([pa, pt], -1)).squeeze(-1)
        m = mask.unsqueeze(-1).to(a.dtype)
        pooled_audio = (a * m).sum(1) / m.sum(1)
        return self.mlp(torch.cat([pooled_audio, t.mean(1)], -1)).squeeze(-1)


def _closest(build: Callable[[int], nn.Module], target: int) -> nn.Module:
    """The model whose hidden width gives the parameter count closest to ``target``."""
    lo, hi = 1, 4096
    while lo < hi:  # parameter count grows with hidden: first hidden reaching the target
        mid = (lo + hi) // 2
        if count_parameters(build(mid)) < target:
            lo = mid + 1
        else:
            hi = mid
    cands = [build(h) for h in {max(1, lo - 1), lo}]
    return min(cands, key=lambda m: abs(count_parameters(m) - target))


def matched_models(dim: int = 32, heads: int = 2, hidden: int = 64, seed: int = 0,
                   **kw) -> dict[str, FusionModel]:
    """The four fusions (:data:`MODEL_NAMES`) with parameter counts matched to the
    cross-attention model's (the others' head/MLP widths are chosen for the closest count)."""
    with torch.random.fork_rng():  # seeded initialisation without touching the global RNG
        torch.manual_seed(seed)
        cross = CrossModalFusion(dim, heads, hidden, **kw)
        target = count_parameters(cross)
        torch.manual_seed(seed)
        early = _closest(lambda h: EarlyFusion(dim, heads, h, **kw), target)
        torch.manual_seed(seed)
        late_attn = _closest(lambda h: LateFusion(dim, h, pool="attention", heads=heads, **kw),
                             target)
        torch.manual_seed(seed)
        late = _closest(lambda h: LateFusion(dim, h, pool="mean", **kw), target)
    return {"cross": cross, "early_concat": early, "late_attnpool": late_attn,
            "late_concat": late}
