"""Date policies: which acquisitions of a time series reach the model.

`bins` is the reference's temporal binning (maestro_reference.md §4.0 step 3): keep `N·⌊T/N⌋`
consecutive acquisitions from an offset `o ∈ {0..T mod N}`, cut them into `N` contiguous bins
and keep one clear acquisition per bin: the one closest to the bin's per-pixel median (eval), or
a random clear one (training with random dates). Cloudy pixels count as missing for the choice
unless every acquisition of the bin has some; acquisitions with missing values are never chosen
while a complete one exists. Where the reference crashes we choose instead: `T < N` keeps the
`T` acquisitions and pads the rest (flagged invalid); a bin whose every acquisition has missing
values keeps the one with the fewest. `all` keeps every acquisition.

Arrays: `x (T, C, H, W)` raw values, `dates (T, 3)`, `valid (T, H, W)` bool (False where cloudy
or nodata, from the shard), `finite (T, H, W)` bool (False where any channel is NaN or nodata).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class Selection:
    """Chosen acquisitions: indices into the series (-1 = padding) and the offset used."""

    index: np.ndarray  # (N,) int64
    offset: int


def draw_offset(num_acq: int, num_bins: int, rng: np.random.Generator) -> int:
    """The reference's bin offset `o ~ U{0..T mod N}` (0 when there is nothing to drop)."""
    if num_acq <= num_bins:
        return 0
    return int(rng.integers(0, num_acq % num_bins + 1))


def select_bins(
    x: np.ndarray,
    cloudy: np.ndarray | None,
    num_bins: int,
    offset: int,
    rng: np.random.Generator | None = None,
    missing: np.ndarray | None = None,
) -> Selection:
    """One acquisition per bin, chosen as the reference does for a given `offset`.

    `x (T, C, H, W)` float with NaN where the data itself is missing; `cloudy (T, H, W)` bool or
    None (no mask source). `rng` given: random clear date per bin (training); None: the date
    closest to the bin's per-pixel nanmedian (eval). `missing (T, H, W)` bool, given with `rng`:
    the pixels missing in any channel (as if all their channels were NaN); the values of `x` are
    then never read, since a random choice needs only which dates are complete.
    """
    t = x.shape[0]
    if t <= num_bins:  # the reference skips binning when T == N; T < N is padded (index -1)
        return Selection(np.concatenate([np.arange(t), np.full(num_bins - t, -1)]).astype(np.int64), 0)
    k = t // num_bins
    if not 0 <= offset <= t - num_bins * k:
        raise ValueError(
            f"bin offset {offset} outside 0..{t - num_bins * k} for {t} acquisitions, {num_bins} bins"
        )
    span = slice(offset, offset + num_bins * k)
    if missing is None or rng is None:
        xb = x[span].reshape(num_bins, k, *x.shape[1:])  # (N, k, C, H, W)
        gone = np.isnan(xb)  # (N, k, C, H, W)
    else:
        gone = missing[span].reshape(num_bins, k, 1, *missing.shape[1:])  # (N, k, 1, H, W)
    if cloudy is not None:
        cb = cloudy[span].reshape(num_bins, k, 1, *cloudy.shape[1:])  # (N, k, 1, H, W)
        all_cloudy = cb.any(axis=(2, 3, 4)).all(axis=1)  # (N,): no clear date in the bin: nothing masked
        hide = cb & ~all_cloudy[:, None, None, None, None]
        gone = gone | hide  # cloudy pixels count as missing in every channel
    missing_date = gone.any(axis=(2, 3, 4))  # (N, k)
    if rng is None:
        if cloudy is not None:
            xb = np.where(hide, np.float32(np.nan), xb)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: their score is NaN anyway
            median = np.nanmedian(xb, axis=1, keepdims=True)  # (N, 1, C, H, W)
        score = np.abs(xb - median).mean(axis=(2, 3, 4))  # (N, k), NaN where any value is missing
    else:
        score = rng.random((num_bins, k))
    score = np.where(missing_date, np.inf, score)
    choice = np.argmin(score, axis=1)  # (N,)
    none_clear = missing_date.all(axis=1)
    if none_clear.any():  # the reference's nanargmin raises here; keep the least-missing date
        holes = gone.sum(axis=(2, 3, 4))  # (N, k); per pixel, not per value, when `missing` is given
        choice = np.where(none_clear, np.argmin(holes, axis=1), choice)
    return Selection(offset + np.arange(num_bins) * k + choice, offset)


def select_all(num_acq: int) -> Selection:
    return Selection(np.arange(num_acq, dtype=np.int64), 0)
