"""FLAIR-HUB: per-modality GeoTIFFs listed in split CSVs, dates in GLOBAL_ALL_MTD GeoPackages.

Layout (datasets.md §4.4): `*_{TRAIN,VALID,TEST}.csv` (in `csv/` or at the root) with `patch_id` and
one path per modality, relative to the CSV's folder. Time series are GeoTIFFs of T×C bands
(`SENTINEL2_TS` T×10, `SENTINEL1-{ASC,DESC}_TS` T×2, `SENTINEL2_MSK-SC` T×2 snow/cloud), unstacked to
(T, C, H, W) with T from the dates. Dates: `GLOBAL_ALL_MTD/GLOBAL_{SENSOR}_MTD_DATES.gpkg` tables,
`acquisition_dates` JSON dicts with 1-based keys for S1/S2 (per patch, or per ROI as MAESTRO keys
them) and `date` YYYYMMDD for aerial and SPOT (day 00 read as 01). The historical
`AERIAL-RLT_PAN` column has no registry modality and is not converted.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import sqlite3
from pathlib import Path

import numpy as np
from einops import rearrange

from maestro.errors import DataError
from shards import valid
from shards.convert import dates, geotiff
from shards.schema import Sample, sample_key

PRESET = "flair_hub"
SPLITS = {"train": "TRAIN", "valid": "VALID", "test": "TEST"}
SINGLE = {
    "AERIAL_RGBI": ("aerial", 4, "AERIAL"),
    "DEM_ELEV": ("dem", 2, "AERIAL"),
    "SPOT_RGBI": ("spot", 4, "SPOT"),
}
SERIES = {
    "SENTINEL2_TS": ("s2", 10, "SENTINEL2"),
    "SENTINEL1-ASC_TS": ("s1_asc", 2, "SENTINEL1-ASC"),
    "SENTINEL1-DESC_TS": ("s1_des", 2, "SENTINEL1-DESC"),
}
TARGETS = {"AERIAL_LABEL-COSIA": "cosia", "ALL_LABEL-LPIS": "lpis"}
CLOUD = "SENTINEL2_MSK-SC"
LICENCE = "Etalab Licence Ouverte 2.0 (FLAIR-HUB, IGN)"


@dataclasses.dataclass(frozen=True)
class Item:
    root: Path
    split: str
    csv_path: Path
    line: int
    row: tuple[tuple[str, str], ...]

    @property
    def sample_id(self) -> str:
        return dict(self.row).get("patch_id") or f"{self.csv_path.name} line {self.line}"


def _csv(root: Path, split: str) -> Path | None:
    found = sorted(root.glob(f"csv/*_{SPLITS[split]}.csv")) + sorted(root.glob(f"*_{SPLITS[split]}.csv"))
    return found[0] if found else None


def required(split: str) -> list[str]:
    return ["GLOBAL_ALL_MTD"]


def splits(root: Path) -> list[str]:
    return [s for s in SPLITS if _csv(root, s)]


def items(root: Path, split: str) -> list[Item]:
    path = _csv(root, split)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "patch_id" not in (reader.fieldnames or []) or "AERIAL_RGBI" not in reader.fieldnames:
            raise DataError(
                f"{path}: columns 'patch_id' and 'AERIAL_RGBI' are required; header is {reader.fieldnames}"
            )
        return [Item(root, split, path, i + 2, tuple(row.items())) for i, row in enumerate(reader)]


@functools.lru_cache(maxsize=16)
def _table(path: Path, column: str) -> dict[str, str]:
    """{patch_id: value} of a GeoPackage's first feature/attribute table (read once per process)."""
    if not path.is_file():
        raise DataError(f"{path}: missing; FLAIR-HUB dates are in GLOBAL_ALL_MTD/*.gpkg")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            (table,) = db.execute(
                "SELECT table_name FROM gpkg_contents ORDER BY table_name LIMIT 1"
            ).fetchone()
            rows = db.execute(f'SELECT patch_id, "{column}" FROM "{table}"').fetchall()
    except (sqlite3.Error, TypeError) as e:
        raise DataError(f"{path}: not a GeoPackage with columns patch_id, {column} ({e})") from e
    return {str(k): v for k, v in rows}


def _lookup(table: dict[str, str], patch_id: str, path: Path) -> str:
    roi = "_".join(patch_id.split("_")[:2])
    value = table.get(patch_id, table.get(roi))
    if value is None:
        raise DataError(f"{path}: no dates for patch {patch_id!r} (nor its ROI {roi!r})")
    return value


def _dates(item: Item, sensor: str, series: bool) -> np.ndarray:
    pid = dict(item.row)["patch_id"]
    path = item.root / "GLOBAL_ALL_MTD" / f"GLOBAL_{sensor}_MTD_DATES.gpkg"
    if series:
        value = _lookup(_table(path, "acquisition_dates"), pid, path)
        return dates.from_dict(value, f"{path} patch {pid}", first_key=1)
    value = _lookup(_table(path, "date"), pid, path)
    return np.array([dates.row(dates.parse_yyyymmdd(value, f"{path} patch {pid}", day00=True))], np.int16)


def _tif(item: Item, column: str, bands: int | None = None):
    rel = dict(item.row)[column]
    return geotiff.read((item.csv_path.parent / rel).resolve(), bands), rel


def _unstack(x: np.ndarray, channels: int, t: int, where: str) -> np.ndarray:
    """(T·C, H, W) band-stacked series -> (T, C, H, W)."""
    if x.shape[0] != t * channels:
        raise DataError(f"{where}: {x.shape[0]} bands for {t} dates × {channels} channels")
    return rearrange(x, "(t c) h w -> t c h w", c=channels)


def read(item: Item) -> Sample:
    row = dict(item.row)
    arrays, when, masks, targets, source = {}, {}, {}, {}, {}
    crs = bounds = None
    for column, (mod, channels, sensor) in SINGLE.items():
        if row.get(column):
            (x, c, b), source[mod] = _tif(item, column, channels)
            arrays[mod], when[mod] = x[None], _dates(item, sensor, series=False)
            if mod == "aerial":
                crs, bounds = c, b
    for column, (mod, channels, sensor) in SERIES.items():
        if row.get(column):
            (x, _, _), source[mod] = _tif(item, column)
            when[mod] = _dates(item, sensor, series=True)
            arrays[mod] = _unstack(x, channels, len(when[mod]), source[mod])
    if row.get(CLOUD) and "s2" in arrays:
        (m, _, _), rel = _tif(item, CLOUD)
        masks["s2"] = valid.from_cloud(_unstack(m, 2, len(when["s2"]), rel), 0.0)
    for column, name in TARGETS.items():
        if row.get(column):
            (y, _, _), source[name] = _tif(item, column)
            targets[name] = y[0] if y.shape[0] == 1 else y
    meta = {
        "id": row["patch_id"],
        "split": item.split,
        "ref_date": when["aerial"][0].tolist(),
        "crs": crs,
        "bounds": bounds,
        "source": source,
        "licence": LICENCE,
    }
    return Sample(sample_key(row["patch_id"]), arrays, when, masks, targets, meta)
