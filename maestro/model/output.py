"""What a pretraining forward returns. Images for logging are built only when asked for, so a
training step pays for the loss alone."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

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


class LazyImages(Mapping[str, Tensor]):
    """{MOD: tensor} built per modality on first access."""

    def __init__(self, keys: Iterable[str], build: Callable[[str], Tensor]):
        self._keys, self._build, self._cache = list(keys), build, {}

    def __getitem__(self, m: str) -> Tensor:
        if m not in self._cache:
            if m not in self._keys:
                raise KeyError(m)
            self._cache[m] = self._build(m)
        return self._cache[m]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class ModelOutput:
    """`loss` (scalar) and `loss_per_modality`; `targets` {MOD: (B, T, C, H, W)} the resized float32
    inputs (invalid pixels zeroed); `masks` {key: (B, L_key)} True = masked (padding dates' tokens
    included: they are never visible; their targets, reconstructions and validity are zero); `valid` {MOD: (B, T, H, W)}
    the pixels that count in the loss; `token_masks` {MOD: (B, G·T·L)}; `patches` {MOD: (B·T·L, P, C)}
    the predicted patches, in the target space of `loss.target_norm`. `reconstructions` and
    `pixel_masks` {MOD: (B, T, C, H, W)} are built per modality on first access.

    For a packed batch (`maestro.model.packed`) B is 1 and T is ΣT, the dates of all samples
    concatenated as in the batch: `targets`, `valid`, `reconstructions` and `pixel_masks` are
    `(1, ΣT, ...)` (sample i's dates at `MOD_cu_dates[i]:MOD_cu_dates[i+1]`), `token_masks` and `patches`
    follow the native token order (band group, then all dates, then position); `masks` are flat
    {key: (ΣL_key,)} with each key's sequences concatenated, their boundaries in
    `cu_seqlens` {key: (S+1,) int32} (samples, or images in `monotemp`/`shared`). `cu_seqlens` is
    None for padded batches.

    Also a read-only mapping of those names (`out["loss"]`, `**out`)."""

    loss: Tensor
    loss_per_modality: dict[str, Tensor]
    targets: dict[str, Tensor]
    masks: dict[str, Tensor]
    valid: dict[str, Tensor]
    token_masks: dict[str, Tensor]
    patches: dict[str, Tensor]
    geometry: dict[str, Geometry] = field(repr=False)
    cu_seqlens: dict[str, Tensor] | None = None
    reconstructions: LazyImages = field(init=False, repr=False)
    pixel_masks: LazyImages = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.reconstructions = LazyImages(self.patches, self._reconstruction)
        self.pixel_masks = LazyImages(self.token_masks, self._pixel_mask)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "geometry"]

    def __getitem__(self, name: str) -> Any:
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    def _reconstruction(self, m: str) -> Tensor:
        geo = self.geometry[m]
        return to_image(self.patches[m], self.targets[m].shape[0], geo.grid, geo.patch)

    def _pixel_mask(self, m: str) -> Tensor:
        """Token mask expanded to pixels, each channel following its band group."""
        geo, t = self.geometry[m], self.targets[m].shape[1]
        mk = rearrange(self.token_masks[m], "b (g t h w) -> b t g h w", g=len(geo.groups), t=t, h=geo.grid)
        mk = torch.cat([mk[:, :, i : i + 1].expand(-1, -1, c, -1, -1) for i, c in enumerate(geo.groups)], 2)
        return repeat(mk, "b t c h w -> b t c (h p1) (w p2)", p1=geo.patch, p2=geo.patch)
