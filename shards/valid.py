"""Valid masks `(T, H, W)` uint8 (1 = usable pixel), made the same way by converters and synthesis."""

from __future__ import annotations

import numpy as np


def from_cloud(masks: np.ndarray, threshold: float | None) -> np.ndarray:
    """(T, K, H, W) snow/cloud probabilities -> valid where every channel is at most the threshold.

    The reference counts a pixel as cloudy when any mask channel exceeds `mask_threshold` (default 0,
    so any non-zero probability, denormals included).
    """
    return (masks <= (threshold or 0.0)).all(1).astype(np.uint8)


def from_nodata(x: np.ndarray, nodata: float | None = None) -> np.ndarray | None:
    """(T, C, H, W) -> valid where all bands are finite (and not `nodata`); None if all pixels are."""
    ok = np.isfinite(x) if np.issubdtype(x.dtype, np.floating) else np.ones(x.shape, bool)
    if nodata is not None:
        ok &= x != nodata
    ok = ok.all(1)
    return None if ok.all() else ok.astype(np.uint8)
