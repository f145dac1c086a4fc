"""Crop geometry shared by every modality of a sample (maestro_reference.md §4.0 steps 1-2).

A tile of `tile_m` metres is `tile_m / resolution_m` pixels in each modality; all modalities are
cut on a common grid of `g = gcd(sizes)` cells, and a crop of `crop_m` metres is `c` cells. A crop
origin `(i, j)` in cells selects, per modality, the pixel window `[i·size/g + shift, …)` of side
`c·size/g`. Training draws the origin at random; otherwise every sample gives the deterministic
grid of non-overlapping crops the reference evaluates (`(g // c)²` crops with stride `g // (g // c)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from maestro.errors import ConfigError, DataError
from maestro.modalities import ModalitySpec


@dataclass(frozen=True)
class Geometry:
    sizes: dict[str, int]  # modality -> tile side in pixels
    shifts: dict[str, int]  # modality -> window shift in pixels
    cells: int  # g: common grid cells per tile side
    crop_cells: int  # c: cells per crop side

    @property
    def origins(self) -> list[tuple[int, int]]:
        """The deterministic evaluation crops, row-major."""
        repeats = self.cells // self.crop_cells
        stride = self.cells // repeats
        return [(a * stride, b * stride) for a in range(repeats) for b in range(repeats)]

    def random_origin(self, rng: np.random.Generator) -> tuple[int, int]:
        hi = self.cells - self.crop_cells
        if hi == 0:
            return 0, 0
        i, j = rng.integers(0, hi + 1, size=2)
        return int(i), int(j)

    def window(self, size: int, origin: tuple[int, int], shift: int = 0) -> tuple[slice, slice]:
        """Pixel window of a raster whose tile side is `size` pixels (a modality or a label raster)."""
        if size % self.cells:
            raise DataError(
                f"a raster of {size} px per tile side does not fit the {self.cells}-cell crop grid"
            )
        f = size // self.cells
        r0, c0 = origin[0] * f + shift, origin[1] * f + shift
        n = self.crop_cells * f
        return slice(r0, r0 + n), slice(c0, c0 + n)


def geometry(specs: dict[str, ModalitySpec], tile_m: float, crop_m: float) -> Geometry:
    """The crop grid of a set of modalities; ConfigError when sizes or the crop do not align."""
    sizes = {}
    for name, s in specs.items():
        px = tile_m / s.resolution_m
        if abs(px - round(px)) > 1e-6 or round(px) <= 0:
            raise ConfigError(
                f"data.modalities.{name}.resolution_m",
                s.resolution_m,
                f"a resolution dividing the {tile_m} m tile into whole pixels",
            )
        sizes[name] = round(px)
    cells = math.gcd(*sizes.values())
    crop = crop_m / tile_m * cells
    if abs(crop - round(crop)) > 1e-6 or not 0 < round(crop) <= cells:
        raise ConfigError(
            "data.dataset",
            f"crop {crop_m} m of a {tile_m} m tile",
            f"a crop that is a whole number of the {cells} common grid cells ({tile_m / cells} m each)",
        )
    return Geometry(sizes, {n: s.shift_px for n, s in specs.items()}, cells, round(crop))
