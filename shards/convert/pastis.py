"""PASTIS, PASTIS-R and PASTIS-HD: per-patch npy time series, a metadata.geojson, five folds.

Layout (datasets.md §4.2): `DATA_S2/S2_{id}.npy` (T,10,128,128) int16, `DATA_S1A|DATA_S1D/S1*_{id}.npy`
(T,3,128,128) when present (PASTIS-R), `DATA_SPOT/**/SPOT6_RVB_1M00_2019_{id}.tif` when present
(PASTIS-HD), `ANNOTATIONS/TARGET_{id}.npy` (3,H,W; channel 0 semantic classes) and
`INSTANCE_ANNOTATIONS/INSTANCES_{id}.npy`. `metadata.geojson` has one feature per patch with `Fold`
and the `dates-S2`/`dates-S1A`/`dates-S1D` dictionaries (0-based keys, YYYYMMDD). Splits are the
folds, named `fold1` … `fold5`. SPOT has one date, 2019-07-01 (as in the reference).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np

from maestro.errors import DataError
from shards.convert import dates, geotiff
from shards.schema import Sample, load_npy, sample_key

PRESET = "pastis_hd"
SERIES = {"s2": ("DATA_S2", "S2", "dates-S2"), "s1_asc": ("DATA_S1A", "S1A", "dates-S1A"), "s1_des": ("DATA_S1D", "S1D", "dates-S1D")}  # fmt: skip
SPOT_DATE = dt.date(2019, 7, 1)
CRS = "EPSG:2154"  # Lambert-93; the PASTIS-HD geojson omits its `crs` member
LICENCE = "PASTIS / PASTIS-R: CC-BY-4.0; PASTIS-HD SPOT imagery: etalab-2.0 (see the dataset cards)"


@dataclasses.dataclass(frozen=True)
class Item:
    root: Path
    split: str
    patch: int
    properties: str  # the feature's properties as JSON (hashable, picklable)
    bounds: tuple[float, ...] | None

    @property
    def sample_id(self) -> str:
        return f"pastis_{self.patch}"


def _features(root: Path) -> list[dict]:
    path = root / "metadata.geojson"
    if not path.is_file():
        raise DataError(f"{path}: missing; a PASTIS archive has metadata.geojson at its root")
    try:
        features = json.loads(path.read_text())["features"]
    except (ValueError, KeyError) as e:
        raise DataError(f"{path}: not a GeoJSON FeatureCollection ({e})") from e
    for i, f in enumerate(features):
        props = f.get("properties", {})
        if "ID_PATCH" not in props or "Fold" not in props:
            raise DataError(f"{path}: feature {i} lacks 'ID_PATCH' or 'Fold'; has {sorted(props)}")
    return features


def required(split: str) -> list[str]:
    return ["metadata.geojson", "DATA_S2", "ANNOTATIONS"]


def splits(root: Path) -> list[str]:
    return [f"fold{k}" for k in sorted({int(f["properties"]["Fold"]) for f in _features(root)})]


def _bounds(geometry: dict | None) -> tuple[float, ...] | None:
    if not geometry:
        return None
    xy = np.array(_flatten(geometry["coordinates"]), np.float64).reshape(-1, 2)
    return (*xy.min(0).tolist(), *xy.max(0).tolist())


def _flatten(coords) -> list[float]:
    if isinstance(coords[0], (int, float)):
        return list(coords[:2])
    return [v for c in coords for v in _flatten(c)]


def items(root: Path, split: str) -> list[Item]:
    fold = int(split.removeprefix("fold"))
    return [
        Item(
            root,
            split,
            int(f["properties"]["ID_PATCH"]),
            json.dumps(f["properties"]),
            _bounds(f.get("geometry")),
        )
        for f in _features(root)
        if int(f["properties"]["Fold"]) == fold
    ]


def _npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    return load_npy(path.read_bytes(), str(path))


def read(item: Item) -> Sample:
    props = json.loads(item.properties)
    where = f"{item.root / 'metadata.geojson'} ID_PATCH={item.patch}"
    arrays, when, source = {}, {}, {}
    for mod, (folder, prefix, key) in SERIES.items():
        if mod != "s2" and not (item.root / folder).is_dir():
            continue  # plain PASTIS has no S1
        path = item.root / folder / f"{prefix}_{item.patch}.npy"
        x = _npy(path)
        channels = 10 if mod == "s2" else 3
        if x.ndim != 4 or x.shape[1] != channels:
            raise DataError(f"{path}: shape {x.shape}; expected (T, {channels}, H, W)")
        if key not in props:
            raise DataError(
                f"{where}: no '{key}' date dictionary (torchgeo's PASTIS-R copy lacks them); "
                f"use the dataset's own metadata.geojson"
            )
        when[mod] = dates.from_dict(props[key], f"{where} '{key}'", first_key=0)
        if len(when[mod]) != x.shape[0]:
            raise DataError(
                f"{path}: {x.shape[0]} dates in the array, {len(when[mod])} in '{key}' of {where}"
            )
        arrays[mod], source[mod] = x, str(path.relative_to(item.root))
    spot = sorted((item.root / "DATA_SPOT").glob(f"**/SPOT6_RVB_1M00_2019_{item.patch}.tif"))
    if spot:
        arrays["spot"] = geotiff.read(spot[0], bands=3)[0][None]  # (1, 3, H, W)
        when["spot"] = np.array([dates.row(SPOT_DATE)], np.int16)
        source["spot"] = str(spot[0].relative_to(item.root))
    target = _npy(item.root / "ANNOTATIONS" / f"TARGET_{item.patch}.npy")
    if target.ndim != 3 or target.shape[1:] != arrays["s2"].shape[2:]:
        raise DataError(
            f"TARGET_{item.patch}.npy: shape {target.shape}; expected (3, {arrays['s2'].shape[2:]})"
        )
    targets = {"pastis_seg": target[0]}
    instances = item.root / "INSTANCE_ANNOTATIONS" / f"INSTANCES_{item.patch}.npy"
    if instances.is_file():
        targets["pastis_instances"] = _npy(instances)
    meta = {
        "id": str(item.patch),
        "split": item.split,
        "ref_date": [2019, SPOT_DATE.timetuple().tm_yday, 0],
        "crs": CRS,
        "bounds": list(item.bounds) if item.bounds else None,
        "source": source,
        "licence": LICENCE,
        "properties": {k: v for k, v in props.items() if not k.startswith("dates-")},
    }
    return Sample(sample_key(item.sample_id), arrays, when, {}, targets, meta)
