"""Per-band statistics of raw values, accumulated while shards are written.

Mean and std are exact over every valid value (finite, not the modality's nodata, and where a valid
mask exists, valid); percentiles come from a deterministic strided subsample of each sample's
valid values, so the figures do not depend on the number of writer processes.
"""

from __future__ import annotations

import numpy as np
from einops import rearrange

PERCENTILES = (1, 2, 5, 25, 50, 75, 95, 98, 99)
SUBSAMPLE_PER_SAMPLE = 256  # values per band and sample kept for percentiles
SUBSAMPLE_CAP = 200_000  # values per band kept in all


def band_values(x: np.ndarray, valid: np.ndarray | None, nodata: float | None) -> list[np.ndarray]:
    """The valid values of each band of a `(T, C, H, W)` array, as float64 vectors."""
    v = rearrange(x, "t c h w -> c (t h w)").astype(np.float64)
    keep = np.isfinite(v)
    if nodata is not None:
        keep &= v != nodata
    if valid is not None:
        keep &= rearrange(valid, "t h w -> 1 (t h w)") != 0
    return [v[c][keep[c]] for c in range(v.shape[0])]


class BandStats:
    """Running count, sum and sum of squares per band, plus a subsample for percentiles."""

    def __init__(self, channels: int):
        self.count = np.zeros(channels, np.int64)
        self.total = np.zeros(channels, np.float64)
        self.total_sq = np.zeros(channels, np.float64)
        self.samples: list[list[np.ndarray]] = [[] for _ in range(channels)]
        self.kept = np.zeros(channels, np.int64)

    def add(self, x: np.ndarray, valid: np.ndarray | None, nodata: float | None) -> None:
        for c, vals in enumerate(band_values(x, valid, nodata)):
            self.count[c] += vals.size
            self.total[c] += vals.sum()
            self.total_sq[c] += np.square(vals).sum()
            if vals.size and self.kept[c] < SUBSAMPLE_CAP:
                step = max(1, vals.size // SUBSAMPLE_PER_SAMPLE)
                sub = vals[::step][:SUBSAMPLE_PER_SAMPLE]
                self.samples[c].append(sub)
                self.kept[c] += sub.size

    def arrays(self) -> dict[str, np.ndarray]:
        """The running figures as plain arrays (`np.savez`-able, loaded without pickle)."""
        out = {"count": self.count, "total": self.total, "total_sq": self.total_sq}
        for c, subs in enumerate(self.samples):
            out[f"sub{c}"] = np.concatenate(subs) if subs else np.zeros(0)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> BandStats:
        acc = cls(len(arrays["count"]))
        acc.count, acc.total, acc.total_sq = arrays["count"], arrays["total"], arrays["total_sq"]
        acc.samples = [[arrays[f"sub{c}"]] for c in range(len(acc.count))]
        acc.kept = np.array([a[0].size for a in acc.samples], np.int64)
        return acc

    def merge(self, other: BandStats) -> None:
        """Add the figures of another part of the split (the subsample stays within the cap)."""
        self.count = self.count + other.count
        self.total = self.total + other.total
        self.total_sq = self.total_sq + other.total_sq
        for c, subs in enumerate(other.samples):
            room = max(0, SUBSAMPLE_CAP - int(self.kept[c]))
            sub = np.concatenate(subs)[:room] if subs else np.zeros(0)
            self.samples[c].append(sub)
            self.kept[c] += sub.size

    def summary(self, bands: list[str]) -> dict:
        """JSON-ready figures per band: count, mean, std, min/max of the subsample, percentiles."""
        out = {}
        for c, name in enumerate(bands):
            n = int(self.count[c])
            if n == 0:
                out[name] = {"count": 0}
                continue
            mean = self.total[c] / n
            var = max(self.total_sq[c] / n - mean * mean, 0.0)
            sub = np.concatenate(self.samples[c])
            pct = np.percentile(sub, PERCENTILES)
            out[name] = {
                "count": n,
                "mean": float(mean),
                "std": float(np.sqrt(var)),
                "percentiles": {f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)},
            }
        return out


def provenance(samples: int) -> dict:
    """How the statistics were computed, stored beside them in the manifest."""
    return {
        "values": "raw values as stored in the shards (before norm_fac, log or elevation scaling)",
        "samples": samples,
        "excluded": "non-finite values, the modality's nodata value, pixels with valid mask 0",
        "mean_std": "exact, population std over all valid values",
        "percentiles": f"from a strided subsample of up to {SUBSAMPLE_PER_SAMPLE} valid values per band and "
        f"sample, at most {SUBSAMPLE_CAP} per band",
    }
