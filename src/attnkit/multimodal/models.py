"""Three ways to fuse an audio stream with a text sequence, with matched parameter counts.

All three share the same encoders: audio frames ``(B, La, 13)`` go through two 1-D convolutions
(local context, O(La)) plus a Fourier encoding of each frame's *fractional* position in its
stream; text tokens ``(B, Lt)`` get an embedding plus the same kind of fractional position.
Then:

- :class:`CrossModalFusion`: text queries attend over the audio frames (cross-attention,
  cost O(Lt * La)), then a per-token MLP and mean pooling.
- :class:`EarlyFusion`: the two sequences are concatenated (with a modality embedding) and one
  self-attention layer runs over both (cost O((Lt + La)^2)), then the same head on the text
  positions.
- :class:`LateFusion`: each modality is mean-pooled to a vector; the two vectors are
  concatenated and fed to an MLP (order inside each stream is lost).

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
]

_N_FREQ = 4


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _fourier(pos: Tensor) -> Tensor:
    """``(..., 2 * _N_FREQ)`` sin/cos features of fractional positions ``pos`` in [0, 1]."""
    k = torch.arange(1, _N_FREQ + 1, dtype=pos.dtype, device=pos.device)
    ang = math.pi * pos.unsqueeze(-1) * k
    return torch.cat([ang.sin(), ang.cos()], -1)


class FusionModel(nn.Module):
    """Shared encoders and input checks; subclasses implement :meth:`fuse`.

    Args:
        dim: model width.
        max_audio_len, max_text_len: longest inputs accepted (longer raise ``ValueError``).
    """

    def __init__(self, dim: int = 32, max_audio_len: int = 8192, max_text_len: int = 16):
        super().__init__()
        self.dim, self.max_audio_len, self.max_text_len = dim, max_audio_len, max_text_len
        self.audio_conv = nn.Sequential(
            nn.Conv1d(N_MFCC, dim, 5, padding=2), nn.GELU(), nn.Conv1d(dim, dim, 5, padding=2)
        )
        self.audio_pos = nn.Linear(2 * _N_FREQ, dim)
        self.token = nn.Embedding(N_DIGITS, dim)
        self.text_pos = nn.Linear(2 * _N_FREQ, dim)

    def check_inputs(self, audio: Tensor, audio_mask: Tensor | None, text: Tensor) -> Tensor:
        """Validate; returns the ``(B, La)`` bool mask (all True when None)."""
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

    def encode(self, audio: Tensor, mask: Tensor, text: Tensor):
        """``(B, La, dim)`` audio and ``(B, Lt, dim)`` text features, and their fractional
        positions ``(B, La)``, ``(B, Lt)``."""
        B, lt = text.shape
        lengths = mask.sum(1, keepdim=True).to(audio.dtype)
        frame = torch.arange(audio.shape[1], dtype=audio.dtype, device=audio.device)
        apos = (frame + 0.5) / lengths
        a = self.audio_conv((audio * mask.unsqueeze(-1)).transpose(1, 2)).transpose(1, 2)
        a = a + self.audio_pos(_fourier(apos))
        tpos = ((torch.arange(lt, dtype=audio.dtype, device=audio.device) + 0.5) / lt).expand(B, lt)
        t = self.token(text) + self.text_pos(_fourier(tpos))
        return a, t, apos, tpos

    def forward(self, audio: Tensor, text: Tensor, audio_mask: Tensor | None = None) -> Tensor:
        """``audio (B, La, 13)``, ``text (B, Lt)`` digit tokens, ``audio_mask (B, La)`` bool
        (True = real frame) -> ``(B,)`` logits that the text names the spoken digits in order."""
        mask = self.check_inputs(audio, audio_mask, text)
        return self.fuse(mask, *self.encode(audio, mask, text))

    def fuse(self, mask: Tensor, a: Tensor, t: Tensor, apos: Tensor, tpos: Tensor) -> Tensor:
        raise NotImplementedError


class AlignmentPrior(nn.Module):
    """A learned locality prior on attention logits, ``-exp(gamma_h) * (p_q - p_k)^2``, with
    ``p`` each token's fractional position in its own stream (so text token ``i`` of ``Lt``
    starts out reading the ``i``-th stretch of the audio).

    Up to a per-query constant (which softmax ignores) the prior is the rank-2 product
    ``[2 s p_q, -s] . [p_k, p_k^2]``, so it is passed as a low-rank bias: no ``Lq x Lk`` tensor,
    and dense attention keeps its fused kernel.
    """

    def __init__(self, heads: int, init_sharpness: float = 30.0):
        super().__init__()
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        if (isinstance(init_sharpness, bool) or not isinstance(init_sharpness, (int, float))
                or not init_sharpness > 0 or not math.isfinite(init_sharpness)):
            raise ValueError(f"init_sharpness must be a finite float > 0, got {init_sharpness!r}")
        self.heads = heads
        self.log_sharpness = nn.Parameter(torch.full((heads,), math.log(init_sharpness)))

    def factors(self, pos_q: Tensor, pos_k: Tensor) -> tuple[Tensor, Tensor]:
        """``pos_q (B, Lq)``, ``pos_k (B, Lk)`` -> ``(qe (B, H, Lq, 2), ke (B, H, Lk, 2))``."""
        s = self.log_sharpness.exp().view(1, -1, 1)
        pq, pk = pos_q.unsqueeze(1), pos_k.unsqueeze(1)
        sq = 2 * s * pq  # (B, H, Lq)
        qe = torch.stack([sq, (-s).expand_as(sq)], -1)
        ke = torch.stack([pk, pk.square()], -1).expand(-1, self.heads, -1, -1)
        return qe, ke


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
    """Text queries attend over audio keys/values (padding-masked), then a per-token head."""

    def __init__(self, dim: int = 32, heads: int = 2, hidden: int = 64, **kw):
        super().__init__(dim, **kw)
        self.cross = CrossAttention(dim, dim, heads, max_context_len=self.max_audio_len)
        self.prior = AlignmentPrior(heads)
        self.head = _TokenHead(dim, hidden)

    def fuse(self, mask, a, t, apos, tpos) -> Tensor:
        return self.head(t, self.cross(t, a, key_padding_mask=~mask,
                                          low_rank_bias=self.prior.factors(tpos, apos)))

    def attention_weights(self, audio: Tensor, text: Tensor, audio_mask: Tensor | None = None):
        """``(B, H, Lt, La)`` cross-attention weights (which frames each text token reads)."""
        mask = self.check_inputs(audio, audio_mask, text)
        a, t, apos, tpos = self.encode(audio, mask, text)
        prior = self.prior.factors(tpos, apos)
        return self.cross(t, a, key_padding_mask=~mask, low_rank_bias=prior,
                          return_weights=True)[1]


class EarlyFusion(FusionModel):
    """Concatenate text and audio (with modality embeddings); self-attention over both."""

    def __init__(self, dim: int = 32, heads: int = 2, hidden: int = 64, **kw):
        super().__init__(dim, **kw)
        self.modality = nn.Parameter(torch.zeros(2, dim))
        self.attn = CrossAttention(dim, dim, heads)  # context = the sequence itself
        self.prior = AlignmentPrior(heads)
        self.head = _TokenHead(dim, hidden)

    def fuse(self, mask, a, t, apos, tpos) -> Tensor:
        lt = t.shape[1]
        seq = torch.cat([t + self.modality[0], a + self.modality[1]], 1)
        keep = torch.cat([mask.new_ones(mask.shape[0], lt), mask], 1)
        pos = torch.cat([tpos, apos], 1)
        out = self.attn(seq, seq, key_padding_mask=~keep,
                        low_rank_bias=self.prior.factors(pos, pos))
        return self.head(t, out[:, :lt])


class LateFusion(FusionModel):
    """Mean-pool each modality to a vector, concatenate, MLP."""

    def __init__(self, dim: int = 32, hidden: int = 64, **kw):
        super().__init__(dim, **kw)
        self.mlp = nn.Sequential(
            nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, 1),
        )

    def fuse(self, mask, a, t, apos, tpos) -> Tensor:
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
    """The three fusions with parameter counts matched to the cross-attention model's (the
    baselines' MLP widths are chosen for the closest count)."""
    with torch.random.fork_rng():  # seeded initialisation without touching the global RNG
        torch.manual_seed(seed)
        cross = CrossModalFusion(dim, heads, hidden, **kw)
        target = count_parameters(cross)
        torch.manual_seed(seed)
        early = _closest(lambda h: EarlyFusion(dim, heads, h, **kw), target)
        torch.manual_seed(seed)
        late = _closest(lambda h: LateFusion(dim, h, **kw), target)
    return {"cross": cross, "early_concat": early, "late_concat": late}
