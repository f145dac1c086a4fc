"""Per-modality value transforms: channel selection, missing-value flags, scaling, flips.

Scaling follows the registry, in the reference's order (maestro_reference.md §4.0 step 4 and
§1.3): float32, `ln(max(x, 1e-10))` if `log_scale`, `/ norm_fac`, then for `rescale_elev`
channels 1.. become `30·(ch0 − ch_k)`. Values flagged invalid (NaN or nodata) are set to 0 after
scaling, so the model never sees a NaN; the `valid` flags travel beside them.
"""

from __future__ import annotations

import numpy as np

from maestro.errors import DataError
from maestro.modalities import ModalitySpec


def select_channels(x: np.ndarray, spec: ModalitySpec, where: str) -> np.ndarray:
    """`(T, C_raw, H, W)` -> `(T, C, H, W)` in the registry's band order."""
    if spec.source_channels is None:
        if x.shape[1] != spec.channels:
            raise DataError(
                f"{where}: {x.shape[1]} stored channels for the {spec.channels} bands {spec.bands}; "
                f"set source_channels in the modality spec to select them"
            )
        return x
    if max(spec.source_channels) >= x.shape[1]:
        raise DataError(
            f"{where}: source_channels {spec.source_channels} but only {x.shape[1]} stored channels"
        )
    return x[:, spec.source_channels]


def missing_values(x: np.ndarray, spec: ModalitySpec) -> np.ndarray | None:
    """`(T, C, H, W)` -> `(T, H, W)` bool, True where any channel is NaN or equals `nodata`.

    None when no value can be missing (integer values and no `nodata`): nothing to allocate or test.
    """
    floating = np.issubdtype(x.dtype, np.floating)
    if not floating and spec.nodata is None:
        return None
    bad = np.isnan(x).any(axis=1) if floating else np.zeros((x.shape[0], *x.shape[2:]), dtype=bool)
    if spec.nodata is not None:
        bad |= (x == spec.nodata).any(axis=1)
    return bad


def scale(x: np.ndarray, spec: ModalitySpec, out: np.ndarray | None = None) -> np.ndarray:
    """Raw values `(..., C, H, W)` -> scaled float32 values, as the reference feeds the model.

    `out` (float32, x's shape) receives them: a slot of a batch buffer, so the values are written
    once; the first step reads `x` in its own dtype and the rest work in place.
    """
    if out is None:
        out = np.empty(x.shape, np.float32)
    if spec.log_scale:
        np.maximum(x, np.float32(1e-10), out=out, dtype=np.float32, casting="unsafe")
        np.log(out, out=out)
        if spec.norm_fac is not None:
            np.divide(out, np.float32(spec.norm_fac), out=out)
    elif spec.norm_fac is not None:
        np.divide(x, np.float32(spec.norm_fac), out=out, dtype=np.float32, casting="unsafe")
    else:
        np.copyto(out, x, casting="unsafe")
    if spec.rescale_elev:
        rest = out[..., 1:, :, :]
        np.subtract(out[..., :1, :, :], rest, out=rest)
        np.multiply(np.float32(30.0), rest, out=rest)
    return out


def scaled_values(
    x: np.ndarray, hole: np.ndarray | None, spec: ModalitySpec, out: np.ndarray | None = None
) -> np.ndarray:
    """Raw `(T, C, H, W)` -> scaled float32, 0 where `hole (T, H, W)` (missing values and padding)."""
    out = scale(x, spec, out)
    if hole is not None:
        np.copyto(out, np.float32(0.0), where=hole[:, None])
    return out


def flips(rng: np.random.Generator) -> tuple[bool, bool, bool]:
    """(flip rows, flip columns, transpose), each with probability ½ (the reference's augmentation)."""
    a, b, c = rng.random(3) < 0.5
    return bool(a), bool(b), bool(c)


def apply_flips(a: np.ndarray, flip: tuple[bool, bool, bool]) -> np.ndarray:
    """Apply the same flips to the last two (H, W) axes of any raster (a view: collate copies it)."""
    if flip[0]:
        a = a[..., ::-1, :]
    if flip[1]:
        a = a[..., ::-1]
    if flip[2]:
        a = np.swapaxes(a, -1, -2)
    return a
