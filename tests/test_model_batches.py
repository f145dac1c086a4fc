"""Synthetic model batches with the shapes a config implies (a helper of the model tests; no tests)."""

from __future__ import annotations

import torch

from maestro.config import Config


def make_batch(cfg: Config, batch: int = 2, seed: int = 0, dates: dict[str, int] | None = None) -> dict:
    """Random scaled values (B, T, C, H, W) per input modality, sorted dates in 2020, ref date mid-year."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, s in cfg.derived.modalities.items():
        t = (dates or {}).get(m, s.num_dates)
        out[m] = torch.rand(batch, t, s.channels, s.image_size, s.image_size, generator=g)
        doy = torch.sort(torch.randint(1, 366, (batch, t), generator=g), dim=1).values
        out[f"{m}_dates"] = torch.stack([torch.full_like(doy, 2020), doy, torch.zeros_like(doy)], -1)
    out["ref_date"] = torch.tensor([[[2020, 182, 0]]]).repeat(batch, 1, 1)
    return out
