"""A small Vision Transformer whose attention runs on :func:`attnkit.attention`.

An image ``(B, C, H, W)`` is cut into ``P x P`` patches; each flattened patch is linearly
embedded into a token, a learned position embedding is added, and ``depth`` transformer blocks
mix the tokens. ``norm`` chooses where LayerNorm sits: before attention and MLP ("pre", the
"auto-exposure" that re-centres and re-scales every token), after the residual sum ("post"), or
nowhere ("none"). Two options move the normalisation earlier: ``embed_norm`` puts a LayerNorm on
the patch embeddings before the position embedding is added, and ``standardize`` z-scores each
input image (over its pixels and channels) before anything else, which makes the whole model
invariant to ``x -> a x + b`` for ``a > 0`` (up to float rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_positive_int
from ..nn.attention import SelfAttention

__all__ = ["ViT", "Block", "standardize_images"]

NORMS = ("pre", "post", "none")


class Block(nn.Module):
    """Transformer block with LayerNorm placement ``norm`` in {"pre", "post", "none"}."""

    def __init__(self, dim: int, num_heads: int, norm: str, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm = norm
        # full attention over the patches, no rotary positions (the ViT adds learned ones)
        self.attn = SelfAttention(dim, num_heads, qkv_bias=True, rope=False)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )
        make = nn.LayerNorm if norm != "none" else (lambda _: nn.Identity())
        self.norm1, self.norm2 = make(dim), make(dim)

    def _attend(self, x: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """``x (B, L, C)`` -> ``(out (B, L, C), weights (B, H, L, L) or None)``."""
        res = self.attn(x, need_weights=need_weights)
        return res if need_weights else (res, None)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        if self.norm == "post":
            a, w = self._attend(x, need_weights)
            x = self.norm1(x + a)
            return self.norm2(x + self.mlp(x)), w
        a, w = self._attend(self.norm1(x), need_weights)  # "pre" (LN) or "none" (identity)
        x = x + a
        return x + self.mlp(self.norm2(x)), w


class ViT(nn.Module):
    """Vision Transformer classifier.

    Args:
        image_size: ``H = W`` of the input images.
        patch_size: ``P``; must divide ``image_size``. Tokens ``L = (image_size / P)^2``.
        in_channels: ``C`` of the input images.
        num_classes: output logits.
        dim, depth, num_heads: token width, number of blocks, attention heads.
        norm: "pre", "post" or "none" (LayerNorm placement).
        patch_bias: whether the patch embedding has a bias (a bias makes brightness
            invariance approximate: ``W (c x) + b != c (W x + b)``).
        pos_embedding: whether to add a learned position embedding (same effect).
        embed_norm: LayerNorm on the patch embeddings before the position embedding is added.
        standardize: z-score each image over its pixels and channels first (``(x - mean) /
            std``; an image with zero spread is refused in :meth:`forward`).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int,
        num_classes: int,
        dim: int,
        depth: int,
        num_heads: int,
        norm: str = "pre",
        *,
        patch_bias: bool = True,
        pos_embedding: bool = True,
        mlp_ratio: int = 2,
        embed_norm: bool = False,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("image_size", image_size), ("patch_size", patch_size),
                            ("in_channels", in_channels), ("num_classes", num_classes),
                            ("dim", dim), ("depth", depth), ("num_heads", num_heads)):
            check_positive_int(name, value)
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} is not divisible by patch_size={patch_size}"
            )
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.norm = norm
        self.standardize = bool(standardize)
        self.grid = image_size // patch_size
        self.num_tokens = self.grid**2
        self.patch_embed = nn.Linear(in_channels * patch_size**2, dim, bias=patch_bias)
        self.embed_norm = nn.LayerNorm(dim) if embed_norm else nn.Identity()
        self.pos_embed = (
            nn.Parameter(torch.randn(1, self.num_tokens, dim) * 0.02) if pos_embedding else None
        )
        self.blocks = nn.ModuleList(Block(dim, num_heads, norm, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim) if norm == "pre" else nn.Identity()
        self.head = nn.Linear(dim, num_classes)

    def patchify(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, L, C * P * P)`` patches in row-major grid order."""
        if not isinstance(x, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
        want = f"(B, {self.in_channels}, {self.image_size}, {self.image_size})"
        if x.dim() != 4:
            raise ValueError(f"images must have shape {want}, got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"images must have {self.in_channels} channel(s) (shape {want}), "
                f"got {x.shape[1]} in shape {tuple(x.shape)}"
            )
        if x.shape[2] != self.image_size or x.shape[3] != self.image_size:
            raise ValueError(f"images must have shape {want}, got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"images must be floating point, got {x.dtype}")
        B, C, P, g = x.shape[0], self.in_channels, self.patch_size, self.grid
        x = x.reshape(B, C, g, P, g, P).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, g * g, C * P * P)

    def forward(
        self, x: Tensor, need_weights: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """``x (B, C, H, W)`` -> logits ``(B, num_classes)``, plus (``need_weights``) a list of
        every layer's attention maps, each ``(B, num_heads, L, L)`` (rows: query patches)."""
        patches = self.patchify(x)
        if self.standardize:
            patches = standardize_images(patches)
        h = self.embed_norm(self.patch_embed(patches))
        if self.pos_embed is not None:
            h = h + self.pos_embed
        maps = []
        for block in self.blocks:
            h, w = block(h, need_weights)
            maps.append(w)
        logits = self.head(self.final_norm(h).mean(1))
        return (logits, maps) if need_weights else logits


def standardize_images(x: Tensor) -> Tensor:
    """Z-score each image ``x (B, ...)`` over all its other dimensions: ``(x - mean) / std``.

    No epsilon (it would break the exact invariance to ``a x + b``); an image whose values are
    all equal has no scale to remove and is refused.
    """
    dims = tuple(range(1, x.dim()))
    centred = x - x.mean(dims, keepdim=True)
    std = centred.square().mean(dims, keepdim=True).sqrt()
    if bool((std == 0).any()):
        bad = (std.flatten() == 0).nonzero().flatten().tolist()
        raise ValueError(f"standardize: image(s) {bad[:5]} are constant (zero spread), "
                         "so there is no brightness scale to remove")
    return centred / std
