"""TreeSatAI-TS: aerial CIR GeoTIFFs + yearly Sentinel-1/2 HDF5 time series + split CSVs.

Layout (datasets.md §4.1): `aerial/NAME.tif` (4×304×304 uint8), `sentinel-ts/NAME_YEAR.h5` with
`sen-2-data` (T,10,6,6), `sen-2-masks` (T,2,6,6) snow/cloud probabilities, `sen-1-{asc,des}-data`
(T,2,6,6) linear backscatter and `*-products` names holding the sensing datetimes; `{split}.csv`
with `aerial_name`, `sen_name`, `aerial_date` (YYYYMMDD) and 15 genus area fractions. Arrays are
kept exactly as stored (NaNs and same-day slices included); the S2 masks become the valid mask.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import h5py
import numpy as np

from maestro.errors import DataError
from maestro.modalities import TREESAT_GENERA, preset
from shards import valid
from shards.convert import dates, geotiff
from shards.schema import Sample, sample_key

PRESET = "treesatai_ts"
SPLITS = ("train", "val", "test")
H5 = {"s2": "sen-2", "s1_asc": "sen-1-asc", "s1_des": "sen-1-des"}
THRESHOLDS = {"treesat_mlc_thresh": 0.07, "treesat_mlc": 0.0}
LICENCE = "CC-BY-4.0 (TreeSatAI-TS, IGNF/TreeSatAI-Time-Series; TreeSatAI Benchmark Archive)"


@dataclasses.dataclass(frozen=True)
class Item:
    root: Path
    split: str
    line: int
    row: tuple[tuple[str, str], ...]

    @property
    def sample_id(self) -> str:
        return Path(dict(self.row).get("aerial_name", f"{self.split}.csv line {self.line}")).stem


def required(split: str) -> list[str]:
    return [f"{split}.csv", "aerial", "sentinel-ts"]


def splits(root: Path) -> list[str]:
    return [s for s in SPLITS if (root / f"{s}.csv").is_file()]


def items(root: Path, split: str) -> list[Item]:
    path = root / f"{split}.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"aerial_name", "sen_name", "aerial_date", *TREESAT_GENERA} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: label columns {sorted(missing)} missing; header is {reader.fieldnames}")
        return [Item(root, split, i + 2, tuple(row.items())) for i, row in enumerate(reader)]


def _h5_series(f: h5py.File, name: str, channels: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(T, C, H, W) data and (T, 3) dates of one sensor of an HDF5 file."""
    for suffix in ("data", "products"):
        if f"{name}-{suffix}" not in f:
            raise DataError(f"{path}: dataset '{name}-{suffix}' missing; has {sorted(f)}")
    x = f[f"{name}-data"][()]
    if x.ndim != 4 or x.shape[1] != channels:
        raise DataError(f"{path}: '{name}-data' is {x.shape}; expected (T, {channels}, H, W)")
    products = [p.decode() if isinstance(p, bytes) else str(p) for p in f[f"{name}-products"][()]]
    if len(products) != x.shape[0]:
        raise DataError(f"{path}: {len(products)} '{name}-products' for {x.shape[0]} dates of '{name}-data'")
    return x, dates.from_products(products, f"{path} '{name}-products'")


def _labels(item: Item) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    row = dict(item.row)
    where = f"{item.root / (item.split + '.csv')} line {item.line}"
    try:
        frac = np.array([float(row[g]) for g in TREESAT_GENERA])
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: genus fractions must be numbers ({e})") from e
    if not np.isfinite(frac).all() or (frac < 0).any() or frac.sum() > 1.001:
        raise DataError(
            f"{where}: genus fractions {frac.tolist()} are not area fractions summing to at most 1"
        )
    targets = {name: (frac > t).astype(np.uint8) for name, t in THRESHOLDS.items()}
    return targets, {g: float(v) for g, v in zip(TREESAT_GENERA, frac) if v > 0}


def read(item: Item) -> Sample:
    row = dict(item.row)
    spec = preset(PRESET).modalities
    aerial_path = item.root / "aerial" / row["aerial_name"]
    aerial, crs, bounds = geotiff.read(aerial_path, bands=spec["aerial"].channels)
    ref = dates.parse_yyyymmdd(row["aerial_date"], f"{item.root / (item.split + '.csv')} line {item.line}")
    arrays = {"aerial": aerial[None]}  # (1, 4, H, W)
    when = {"aerial": np.array([dates.row(ref)], np.int16)}
    masks = {}
    h5_path = item.root / "sentinel-ts" / row["sen_name"]
    if not h5_path.is_file():
        raise DataError(f"{h5_path}: missing")
    products = {}
    try:
        with h5py.File(h5_path, "r") as f:
            for mod, name in H5.items():
                arrays[mod], when[mod] = _h5_series(f, name, spec[mod].channels, h5_path)
                products[mod] = [p.decode() for p in f[f"{name}-products"][()]]
            masks["s2"] = f["sen-2-masks"][()] if "sen-2-masks" in f else None
    except OSError as e:
        raise DataError(f"{h5_path}: unreadable HDF5 ({e})") from e
    if masks["s2"] is None or masks["s2"].shape[0] != arrays["s2"].shape[0] or masks["s2"].ndim != 4:
        raise DataError(
            f"{h5_path}: 'sen-2-masks' missing or not (T, 2, H, W) for {arrays['s2'].shape[0]} dates"
        )
    valid_masks = {"s2": valid.from_cloud(masks["s2"], spec["s2"].cloud_threshold)}
    for mod in ("s1_asc", "s1_des"):
        v = valid.from_nodata(arrays[mod])
        if v is not None:
            valid_masks[mod] = v
    targets, fractions = _labels(item)
    meta = {
        "id": item.sample_id,
        "split": item.split,
        "ref_date": dates.row(ref),
        "crs": crs,
        "bounds": bounds,
        "source": {"aerial": f"aerial/{row['aerial_name']}", "sentinel": f"sentinel-ts/{row['sen_name']}"},
        "licence": LICENCE,
        "fractions": fractions,
        "products": products,
        "valid_from": f"sen-2-masks <= {spec['s2'].cloud_threshold or 0.0} (snow and cloud); S1: finite",
    }
    return Sample(sample_key(item.sample_id), arrays, when, valid_masks, targets, meta)
