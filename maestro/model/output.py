"""What a pretraining forward returns. Images for logging are built only when asked for, so the
training step pays for the loss alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from einops import rearrange, repeat
from torch import Tensor

from maestro.model.patch_embed import to_image


@dataclass(frozen=True)
class Geometry:
    """Token layout of a modality: band-group sizes, grid side g, patch side p."""

    groups: tuple[int, ...]
    grid: int
    patch: int


@dataclass
class ModelOutput:
    """`loss` (scalar) and `loss_per_modality`; `targets` {MOD: (B, T, C, H, W)} the resized inputs
    (invalid pixels zeroed); `masks` {key: (B, L_key)} True = masked; `valid` {MOD: (B, T, H, W)}
    the pixels that count in the loss; `token_masks` {MOD: (B, G·T·L)}; `patches` {MOD: (B·T·L, P, C)}
    the predicted patches, in the target space of `loss.target_norm`. `reconstructions` and
    `pixel_masks` {MOD: (B, T, C, H, W)} are computed on first access."""

    loss: Tensor
    loss_per_modality: dict[str, Tensor]
    targets: dict[str, Tensor]
    masks: dict[str, Tensor]
    valid: dict[str, Tensor]
    token_masks: dict[str, Tensor]
    patches: dict[str, Tensor]
    geometry: dict[str, Geometry] = field(repr=False)

    @cached_property
    def reconstructions(self) -> dict[str, Tensor]:
        return {
            m: to_image(p, self.targets[m].shape[0], self.geometry[m].grid, self.geometry[m].patch)
            for m, p in self.patches.items()
        }

    @cached_property
    def pixel_masks(self) -> dict[str, Tensor]:
        """Token masks expanded to pixels, each channel following its band group."""
        out = {}
        for m, tm in self.token_masks.items():
            geo, t = self.geometry[m], self.targets[m].shape[1]
            mk = rearrange(tm, "b (g t h w) -> b t g h w", g=len(geo.groups), t=t, h=geo.grid)
            mk = torch.cat(
                [mk[:, :, i : i + 1].expand(-1, -1, c, -1, -1) for i, c in enumerate(geo.groups)], 2
            )
            out[m] = repeat(mk, "b t c h w -> b t c (h p1) (w p2)", p1=geo.patch, p2=geo.patch)
        return out
