"""Downstream heads on the encoder's tokens, as the reference's (maestro_reference.md §1.9).

Names follow the reference's state dict (`heads.TARGET.reduce.{norm,to_kv,query,norm_fc}`,
`heads.TARGET.linear` or `heads.TARGET.conv`), so its weights load strictly.

- `AttentiveReduce`: LayerNorm, one learned query attending over the tokens with 8 heads
  (`softmax(q·kᵀ / √(E/8))`, keys and values from one bias-free projection), heads concatenated,
  LayerNorm; no output projection, no residual. `MeanReduce` is the `linear` head's mean.
- `ClassificationHead`: every token of every modality `(B, ΣL, E)` reduced, then `Linear(E, K)`.
- `SegmentationHead`: each modality's token map resized (bilinear) to the reference modality's
  grid `g`, the `ΣD` tokens at each location reduced, a 1×1 conv `E → K·q²` with
  `q = target pixels / g`, rearranged to logits `(B, K, g·q, g·q)` (the reference's `(B, 1, K, ·, ·)`
  without its singleton axis). The conv's channels are ordered `(q1, q2, K)`, `q1` slowest, as
  the reference's Pixelify.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from maestro.errors import ConfigError
from maestro.modalities import ModalitySpec, TargetSpec

REDUCE_HEADS = 8


class AttentiveReduce(nn.Module):
    """(N, S, E) tokens -> (N, E): one learned query attending over the S tokens."""

    def __init__(self, dim: int, heads: int = REDUCE_HEADS):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attentive head: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.query = nn.Parameter(torch.randn(dim))
        self.norm_fc = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        k, v = self.to_kv(self.norm(x)).chunk(2, dim=-1)
        k, v = (rearrange(t, "n s (h d) -> n h s d", h=self.heads) for t in (k, v))
        q = rearrange(self.query, "(h d) -> h 1 d", h=self.heads).to(k.dtype)
        attn = torch.softmax((q * k).sum(-1) * k.shape[-1] ** -0.5, dim=-1)  # (N, h, S)
        out = torch.einsum("nhs,nhsd->nhd", attn, v)
        return self.norm_fc(rearrange(out, "n h d -> n (h d)"))


class MeanReduce(nn.Module):
    """(N, S, E) -> (N, E): the mean over tokens (the reference's `linear` head)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)


def reduce_module(kind: str, dim: int) -> nn.Module:
    if kind == "attentive":
        return AttentiveReduce(dim)
    if kind == "linear":
        return MeanReduce()
    raise ValueError(f"unknown head kind {kind!r}; expected 'attentive' or 'linear'")


class ClassificationHead(nn.Module):
    """{MOD: (B, n_m, E)} -> logits (B, K): all tokens reduced, then a linear layer."""

    def __init__(self, kind: str, dim: int, classes: int):
        super().__init__()
        self.reduce = reduce_module(kind, dim)
        self.linear = nn.Linear(dim, classes)

    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        return self.linear(self.reduce(torch.cat(list(tokens.values()), 1)))


class SegmentationHead(nn.Module):
    """{MOD: (B, G·T·L, E)} -> logits (B, K, H, W) on the target's pixel grid."""

    def __init__(self, kind: str, dim: int, classes: int, grid: int, scale: int, grids: dict[str, int]):
        super().__init__()
        self.grid, self.scale, self.grids, self.classes = grid, scale, grids, classes
        self.reduce = reduce_module(kind, dim)
        self.conv = nn.Conv2d(dim, classes * scale * scale, kernel_size=1)

    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        g = self.grid
        maps = []
        for m, x in tokens.items():
            side = self.grids[m]
            b = x.shape[0]
            x = rearrange(x, "b (d y z) e -> (b d) e y z", y=side, z=side)
            if side != g:
                x = F.interpolate(x, size=(g, g), mode="bilinear")
            maps.append(rearrange(x, "(b d) e y z -> b d (y z) e", b=b))
        x = torch.cat(maps, 1)  # (B, ΣD, L, E)
        b = x.shape[0]
        pooled = self.reduce(rearrange(x, "b d l e -> (b l) d e"))  # (B·L, E)
        y = self.conv(rearrange(pooled, "(b y z) e -> b e y z", b=b, y=g, z=g))
        q = self.scale
        return rearrange(y, "b (q1 q2 k) y z -> b k (y q1) (z q2)", q1=q, q2=q, k=self.classes)


def target_pixels(target: TargetSpec, crop_m: float) -> int:
    """Pixels across the loader crop of a segmentation target."""
    return round(crop_m / target.resolution_m)


def build_heads(
    targets: dict[str, TargetSpec], specs: dict[str, ModalitySpec], dim: int, kind: str, crop_m: float
) -> nn.ModuleDict:
    """One head per target, named after it."""
    heads = nn.ModuleDict()
    for name, t in targets.items():
        if t.kind == "segmentation":
            if t.reference not in specs:
                raise ConfigError(
                    "data.inputs",
                    sorted(specs),
                    f"the modality '{t.reference}' the head of '{name}' predicts from",
                )
            grid = specs[t.reference].grid
            pixels = target_pixels(t, crop_m)
            if pixels % grid:
                raise ConfigError(
                    f"data.modalities.{t.reference}.patch_size",
                    specs[t.reference].patch_size,
                    f"a token grid dividing the {pixels} px of '{name}' per crop (grid now {grid})",
                )
            grids = {m: s.grid for m, s in specs.items()}
            heads[name] = SegmentationHead(kind, dim, t.num_classes, grid, pixels // grid, grids)
        else:
            heads[name] = ClassificationHead(kind, dim, t.num_classes)
    return heads
