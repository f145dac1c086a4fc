"""Tokenization: patch embedding per band group, and its inverse from decoder tokens to pixels.

`Patchify`: for each band group a stride-p convolution then `GroupNorm(1, E)`, which normalizes over
the whole image of one date (masked patches included, as the reference). `Pixelify`: for each band
group a 1×1 convolution from the decoder width to `c_g·p²` values per token. Modalities declaring
the same `embed` name share one of each. Names follow the reference state dict
(`patchify_bands.{k}.conv`, `pixelify_bands.{k}.conv`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class PatchifyBands(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.norm = nn.GroupNorm(1, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, c, H, W) -> (B, T, L, E)."""
        b = x.shape[0]
        y = self.norm(self.conv(rearrange(x, "b t c h w -> (b t) c h w")))
        return rearrange(y, "(b t) e h w -> b t (h w) e", b=b)


class Patchify(nn.Module):
    def __init__(self, groups: list[int], dim: int, patch: int):
        super().__init__()
        self.groups = list(groups)
        self.patchify_bands = nn.ModuleList(PatchifyBands(c, dim, patch) for c in groups)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C, H, W) -> (B, G·T, L, E), band group outer."""
        parts = torch.split(x, self.groups, dim=2)
        return torch.cat([pb(xg) for pb, xg in zip(self.patchify_bands, parts)], dim=1)


class PixelifyBands(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(dim, channels * patch * patch, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Tokens (M, E_d) -> patch values (M, P, c) from the reference's (p1 p2 c) channel order.
        A 1×1 convolution on the token map is the same per-token linear map."""
        y = F.linear(x, self.conv.weight.flatten(1), self.conv.bias)
        return rearrange(y, "m (pp c) -> m pp c", c=self.channels)


class Pixelify(nn.Module):
    def __init__(self, groups: list[int], dim: int, patch: int):
        super().__init__()
        self.groups = list(groups)
        self.pixelify_bands = nn.ModuleList(PixelifyBands(c, dim, patch) for c in groups)

    def forward(self, x: Tensor) -> Tensor:
        """Tokens (B, G·T·L, E_d), band group outer -> patch values (B·T·L, P, C)."""
        parts = x.chunk(len(self.groups), dim=1)  # G × (B, T·L, E_d)
        return torch.cat(
            [pb(rearrange(xg, "b n e -> (b n) e")) for pb, xg in zip(self.pixelify_bands, parts)], -1
        )


def to_patches(x: Tensor, patch: int) -> Tensor:
    """Image (B, T, C, H, W) -> patches (B·T·L, P, C), tokens in date then row-major order."""
    return rearrange(x, "b t c (h p1) (w p2) -> (b t h w) (p1 p2) c", p1=patch, p2=patch)


def to_image(x: Tensor, batch: int, grid: int, patch: int) -> Tensor:
    """Patches (B·T·L, P, C) -> image (B, T, C, H, W); the inverse of `to_patches`."""
    return rearrange(
        x, "(b t h w) (p1 p2) c -> b t c (h p1) (w p2)", b=batch, h=grid, w=grid, p1=patch, p2=patch
    )
