"""From one decoded shard sample to model-ready items: crop → date policy → flips → scaling.

Only the members a recipe uses are decoded (`needed`): targets only when an evaluation asks
for them (`Recipe.from_config(..., targets=True)`). An item holds, per input modality `MOD`: `MOD (T, C, h, w)` values, `MOD_dates (T, 3)` int16,
`MOD_valid (T, h, w)` bool; `ref_date (1, 3)` int16; the targets present; and `_key`. `select`
gives raw items: values in their stored dtype (often views of the decoded arrays, never written
to) and `MOD_hole (T, h, w)`, the pixels to zero after scaling (None when there are none); the
loader's collate scales them straight into the batch buffers. `prepare` gives scaled items:
float32 values, 0 where invalid, each scaled on its own as the reference's dataset does. Training gives one item per sample (random crop, random flips when
`augment`); evaluation gives the deterministic crop grid, unflipped, with the dates chosen as the
reference's eval mode does (the bin offset is still drawn, as the reference draws it in every stage).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from maestro.config import Config
from maestro.data import dates as date_policy
from maestro.data.geometry import Geometry, geometry
from maestro.data.transforms import apply_flips, flips, missing_values, scaled_values, select_channels
from maestro.errors import DataError
from maestro.modalities import ModalitySpec, TargetSpec
from shards.schema import Sample, load_npy


@dataclass(frozen=True)
class Recipe:
    """Everything the per-sample transforms need, taken once from a resolved config."""

    specs: dict[str, ModalitySpec]
    targets: dict[str, TargetSpec]
    geom: Geometry
    ref_date: str
    train: bool
    augment: bool
    random_dates: bool

    @classmethod
    def from_config(cls, cfg: Config, train: bool, targets: bool = False) -> Recipe:
        """`targets`: ship the dataset's targets too (evaluation); pretraining reads none."""
        d = cfg.derived
        return cls(
            specs=dict(d.modalities),
            targets=dict(d.targets) if targets else {},
            geom=geometry(d.modalities, d.tile_m, d.crop_m),
            ref_date=d.ref_date,
            train=train,
            augment=train and cfg.data.augment,
            random_dates=train and cfg.data.random_dates,
        )


def needed(members: dict[str, bytes], recipe: Recipe, where: str) -> dict[str, bytes]:
    """The members of one sample that the recipe uses, for `shards.schema.decode`: its input
    modalities and targets; the others (label rasters in pretraining, sensors not fed to the
    model) are dropped undecoded, and `meta.json` lists only what is kept."""
    try:
        meta = json.loads(members["meta.json"])
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: 'meta.json' is missing or not valid JSON ({e})") from e
    mods = [m for m in meta.get("modalities", []) if m not in recipe.specs]
    tgts = [t for t in meta.get("targets", []) if t not in recipe.targets]
    if not mods and not tgts:
        return members
    ref = f"{recipe.ref_date}.dates.npy"
    if recipe.ref_date in mods and ref in members:  # the reference date of a sensor not fed in
        meta["_ref_date"] = load_npy(members[ref], f"{where} member '{ref}'")[:1].tolist()
    drop = {f"{t}.npy" for t in tgts} | {
        f"{m}{s}" for m in mods for s in (".npy", ".dates.npy", ".valid.npy")
    }
    kept = {k: v for k, v in members.items() if k not in drop}
    meta["modalities"] = [m for m in meta.get("modalities", []) if m in recipe.specs]
    meta["targets"] = [t for t in meta.get("targets", []) if t in recipe.targets]
    kept["meta.json"] = json.dumps(meta).encode()
    return kept


def reference_date(item: dict[str, Any], sample: Sample, recipe: Recipe, where: str) -> np.ndarray:
    """`(1, 3)` int16: the first date of the reference modality (`data.ref_date`, else the preset's),
    an input's as selected or, when it is not an input, as stored in the shard (`needed` keeps it
    in `meta.json` as `_ref_date`); or the fixed date `data.ref_date` gives."""
    ref = recipe.ref_date
    if ref in recipe.specs:
        return item[f"{ref}_dates"][:1]
    if ref in sample.dates:
        return np.asarray(sample.dates[ref][:1], dtype=np.int16)
    if "_ref_date" in sample.meta:
        return np.asarray(sample.meta["_ref_date"], dtype=np.int16).reshape(1, 3)
    try:
        return fixed_date(ref)
    except ValueError:
        raise DataError(
            f"{where}: no dates of '{ref}', the reference-date modality (data.ref_date or the "
            f"preset's); store '{ref}' in the shards, or set data.ref_date to an input or a date YYYY-MM-DD"
        ) from None


def fixed_date(text: str) -> np.ndarray:
    """'YYYY-MM-DD' -> `(1, 3)` int16 `(year, day_of_year, 0)`."""
    d = datetime.date.fromisoformat(text)
    return np.array([[d.year, d.timetuple().tm_yday, 0]], dtype=np.int16)


def select_modality(
    x: np.ndarray,
    acq_dates: np.ndarray,
    cloudy: np.ndarray | None,
    spec: ModalitySpec,
    rng: np.random.Generator,
    random_dates: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Cropped raw `x (T, C, h, w)` -> the chosen raw values `(N, C, h, w)` (a view of `x` when every
    date is kept), dates `(N, 3)`, valid `(N, h, w)` and the holes to zero after scaling `(N, h, w)`
    (missing values and padding; None when there is none)."""
    missing = missing_values(x, spec)  # (T, h, w) or None
    if spec.dates == "bins":
        t = x.shape[0]
        offset = date_policy.draw_offset(t, spec.num_dates, rng)
        if t > spec.num_dates and random_dates:  # which dates are complete is all a random pick needs
            gone = np.zeros((t, *x.shape[2:]), bool) if missing is None else missing
            sel = date_policy.select_bins(x, cloudy, spec.num_dates, offset, rng, missing=gone)
        elif t > spec.num_dates:  # values matter only when there is a choice to make
            x_nan = x.astype(np.float32, copy=False)
            if missing is not None:
                x_nan = np.where(missing[:, None], np.float32(np.nan), x_nan)
            sel = date_policy.select_bins(x_nan, cloudy, spec.num_dates, offset)
        else:
            sel = date_policy.select_bins(x[:, :0], None, spec.num_dates, offset)
    else:
        sel = date_policy.select_all(x.shape[0])
    n, (c, h, w) = len(sel.index), x.shape[1:]
    if x.shape[0] == 0:  # nothing acquired: every bin is padding
        none = np.zeros((n, h, w), bool)
        return np.zeros((n, c, h, w), x.dtype), np.zeros((n, 3), np.int16), none, ~none
    pad = sel.index < 0
    if n == x.shape[0] and not pad.any() and (sel.index == np.arange(n)).all():
        idx: np.ndarray | slice = slice(None)  # every date, in order: no copy
    else:
        idx = np.where(pad, 0, sel.index)
    hole = None if missing is None else missing[idx]
    valid = np.ones((n, h, w), bool) if hole is None else ~hole
    if cloudy is not None:
        valid &= ~cloudy[idx]
    if pad.any():
        valid[pad] = False
        hole = pad[:, None, None] | (False if hole is None else hole)
        hole = np.broadcast_to(hole, (n, h, w))
    if hole is not None and not hole.any():
        hole = None
    return x[idx], acq_dates[idx].astype(np.int16), valid, hole


def modality_item(
    x: np.ndarray,
    acq_dates: np.ndarray,
    cloudy: np.ndarray | None,
    spec: ModalitySpec,
    rng: np.random.Generator,
    random_dates: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cropped raw `x (T, C, h, w)` -> scaled `(N, C, h, w)`, dates `(N, 3)`, valid `(N, h, w)`."""
    raw, dates, valid, hole = select_modality(x, acq_dates, cloudy, spec, rng, random_dates)
    return scaled_values(raw, hole, spec), dates, valid


def select(sample: Sample, recipe: Recipe, rng: np.random.Generator, where: str) -> list[dict[str, Any]]:
    """The raw model items of one sample (one in training, the crop grid otherwise)."""
    geom = recipe.geom
    origins = [geom.random_origin(rng)] if recipe.train else geom.origins
    items = []
    for origin in origins:
        item: dict[str, Any] = {"_key": sample.key}
        for name, spec in recipe.specs.items():
            if name not in sample.arrays:
                raise DataError(f"{where}: input modality '{name}' is missing (has {sorted(sample.arrays)})")
            x = select_channels(sample.arrays[name], spec, f"{where} '{name}.npy'")
            rows, cols = geom.window(geom.sizes[name], origin, geom.shifts[name])
            if x.shape[2] < rows.stop or x.shape[3] < cols.stop:
                raise DataError(
                    f"{where}: '{name}.npy' is {x.shape[2]}x{x.shape[3]} px; the crop needs "
                    f"{rows.stop}x{cols.stop} (tile {geom.sizes[name]} px + shift {geom.shifts[name]})"
                )
            valid = sample.valid.get(name)
            cloudy = None if valid is None else valid[:, rows, cols] == 0
            raw, acq, ok, hole = select_modality(
                x[:, :, rows, cols], sample.dates[name], cloudy, spec, rng, recipe.random_dates
            )
            item[name], item[f"{name}_dates"], item[f"{name}_valid"] = raw, acq, ok
            item[f"{name}_hole"] = hole
        item["ref_date"] = reference_date(item, sample, recipe, where)
        for name, tspec in recipe.targets.items():
            if name not in sample.targets:
                continue
            y = sample.targets[name]
            if tspec.kind == "segmentation":
                if y.ndim < 2 or y.shape[-1] != y.shape[-2]:
                    raise DataError(f"{where}: target '{name}.npy' is {y.shape}; expected a square raster")
                rows, cols = geom.window(y.shape[-1], origin)
                y = y[..., rows, cols]
            item[name] = np.ascontiguousarray(y)
        if recipe.augment:
            flip = flips(rng)
            rasters = [*recipe.specs, *(f"{m}_valid" for m in recipe.specs)]
            rasters += [f"{m}_hole" for m in recipe.specs if item[f"{m}_hole"] is not None]
            rasters += [t for t, ts in recipe.targets.items() if ts.kind == "segmentation" and t in item]
            for name in rasters:
                item[name] = apply_flips(item[name], flip)
        items.append(item)
    return items


def scale_item(item: dict[str, Any], specs: dict[str, ModalitySpec]) -> dict[str, Any]:
    """A raw item's values scaled on their own (float32, holes zeroed), as the reference's dataset does."""
    for name, spec in specs.items():
        item[name] = scaled_values(item[name], item.pop(f"{name}_hole"), spec)
    return item


def prepare(sample: Sample, recipe: Recipe, rng: np.random.Generator, where: str) -> list[dict[str, Any]]:
    """The scaled model items of one sample, each on its own (the reference's per-sample way)."""
    return [scale_item(item, recipe.specs) for item in select(sample, recipe, rng, where)]
