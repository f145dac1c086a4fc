"""Fixed encodings added to tokens: 2-D sin-cos position on a common ground grid, and dates.

Both live in disjoint channel slots of the token width `dim` (maestro_reference.md §1.4–1.5): the
position uses the first `dim − 8` channels, the date the last 8. The position table is built once
on the reference grid of `S × S` cells and averaged over each modality's token footprint, so tokens
of different resolutions covering the same ground get consistent encodings; the per-modality tables
are computed once at model construction (§7.1), not every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor

DATE_DIM = 8
DAYS_PER_YEAR = 365.25


def sincos_table(side: int, dim: int) -> Tensor:
    """(S, S, dim) table: cell (row y, column x) holds [sin xω, cos xω, sin yω, cos yω, 0₈],
    ω_i = 10000^(−i/(n−1)), i < n = (dim − 8)/4."""
    n = (dim - DATE_DIM) // 4
    if (dim - DATE_DIM) % 4 or n < 2:
        raise ValueError(f"token width {dim} must be 8 + a multiple of 4 (at least 16)")
    omega = 1.0 / 10000.0 ** (torch.arange(n) / (n - 1))  # (n,) float32, as the reference
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    xw, yw = x[..., None] * omega, y[..., None] * omega  # (S, S, n)
    return torch.cat([xw.sin(), xw.cos(), yw.sin(), yw.cos(), torch.zeros(side, side, DATE_DIM)], -1)


def position_encoding(table: Tensor, grid: int) -> Tensor:
    """(L = grid², dim): a `sincos_table` (S, S, dim) averaged over each token's footprint, row-major.

    When `S` is not a multiple of `grid`, the table is first resized bilinearly to the nearest
    multiple (as the reference), then mean-pooled over `S'/grid` blocks."""
    side = table.shape[0]
    table = rearrange(table, "h w e -> 1 e h w")
    if side % grid:
        resized = grid * max(1, round(side / grid))
        table = F.interpolate(table, size=(resized, resized), mode="bilinear", align_corners=False)
    return reduce(table, "1 e (h a) (w b) -> (h w) e", "mean", h=grid, w=grid)


def date_encoding(dates: Tensor, ref_date: Tensor, dim: int, scale: float = 1.0) -> Tensor:
    """dates (B, T, 3) and ref_date (B, 1, 3) rows (year, day of year, hour) -> (B, T, dim).

    Zero except the last 8 channels: [Δ, Δ, Δ, Δ, sin φ, cos φ, sin ψ, cos ψ]·scale with Δ the years
    from the reference date, φ = 2π·doy/365.25 and ψ = 2π·hour/24."""
    d, r = dates.float(), ref_date.float()  # float32 arithmetic, as the reference
    delta = (d[..., 0] + d[..., 1] / DAYS_PER_YEAR) - (r[..., 0] + r[..., 1] / DAYS_PER_YEAR)  # (B, T)
    phi = 2 * math.pi * d[..., 1] / DAYS_PER_YEAR
    psi = 2 * math.pi * d[..., 2] / 24
    slot = torch.stack([delta, delta, delta, delta, phi.sin(), phi.cos(), psi.sin(), psi.cos()], -1)
    return F.pad(slot * scale, (dim - DATE_DIM, 0))
