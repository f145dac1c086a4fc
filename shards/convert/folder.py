"""A folder per sample, for any sensor: `ROOT/SPLIT/SAMPLE_ID/MOD.npy` (or `MOD.tif`) + `MOD.dates.csv`.

The layout is `shards.layouts.LAYOUTS["folder"]`. The modalities (and their raw channels and
dtype) come from a config, so a user's own sensor declared under `data.modalities` converts like a
preset's; every sample goes through `shards.own.to_sample`, the same validation as the Python API.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
from einops import rearrange

from maestro.errors import DataError
from maestro.modalities import ModalitySpec
from shards import own
from shards.convert import geotiff
from shards.schema import Sample, load_npy
from shards.synth import raw_channels

PRESET = None  # the modalities come from the config
SUFFIXES = (".npy", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Item:
    root: Path
    split: str
    name: str
    specs: tuple[tuple[str, ModalitySpec], ...]

    @property
    def sample_id(self) -> str:
        return self.name


def splits(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(q.is_dir() for q in p.iterdir()))


def required(split: str) -> list[str]:
    return [split]


def items(root: Path, split: str, specs: dict[str, ModalitySpec]) -> list[Item]:
    frozen = tuple(specs.items())
    return [Item(root, split, p.name, frozen) for p in sorted((root / split).iterdir()) if p.is_dir()]


def _dates(path: Path) -> np.ndarray:
    """(T, 3) rows from a CSV with header `year,day_of_year[,hour]` or `date[,hour]` (YYYY-MM-DD)."""
    if not path.is_file():
        raise DataError(f"{path}: missing; every series MOD.npy needs MOD.dates.csv beside it")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    header = set(rows[0]) if rows else set()
    out = []
    for i, row in enumerate(rows):
        where = f"{path} line {i + 2}"
        try:
            hour = int(row.get("hour") or 0)
            if {"year", "day_of_year"} <= header:
                out.append([int(row["year"]), int(row["day_of_year"]), hour])
            elif "date" in header:
                d = dt.date.fromisoformat(row["date"].strip())
                out.append([d.year, d.timetuple().tm_yday, hour])
            else:
                raise DataError(
                    f"{path}: header {sorted(header)}; expected year,day_of_year[,hour] or date[,hour]"
                )
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}: {row} is not a date row ({e})") from e
    if not out:
        raise DataError(f"{path}: no date rows; expected one row per date of the series")
    return np.array(out, np.int64)


def _series(folder: Path, mod: str, spec: ModalitySpec, t: int) -> tuple[np.ndarray, dict]:
    found = [folder / f"{mod}{s}" for s in SUFFIXES if (folder / f"{mod}{s}").is_file()]
    if not found:
        raise DataError(f"{folder}: no {mod}.npy or {mod}.tif for modality '{mod}'")
    path = found[0]
    if path.suffix == ".npy":
        return load_npy(path.read_bytes(), str(path)), {}
    x, crs, bounds = geotiff.read(path)
    c = raw_channels(spec)
    if x.shape[0] != t * c:
        raise DataError(f"{path}: {x.shape[0]} bands; expected {t} dates x {c} channels (date-major)")
    return rearrange(x, "(t c) h w -> t c h w", c=c), {"crs": crs, "bounds": bounds}


def read(item: Item) -> Sample:
    folder = item.root / item.split / item.name
    specs = dict(item.specs)
    known = {"meta.json"}
    raw = {"id": item.name, "arrays": {}, "dates": {}, "valid": {}, "labels": {}, "meta": {}}
    for mod, spec in specs.items():
        when = _dates(folder / f"{mod}.dates.csv")
        x, geo = _series(folder, mod, spec, len(when))
        raw["arrays"][mod], raw["dates"][mod] = x, when
        for k, v in geo.items():
            raw["meta"].setdefault(k, v)
        valid = folder / f"{mod}.valid.npy"
        if valid.is_file():
            raw["valid"][mod] = load_npy(valid.read_bytes(), str(valid))
        known |= {f"{mod}{s}" for s in SUFFIXES} | {f"{mod}.dates.csv", f"{mod}.valid.npy"}
    for path in sorted(folder.glob("*.label.npy")):
        raw["labels"][path.name.removesuffix(".label.npy")] = load_npy(path.read_bytes(), str(path))
        known.add(path.name)
    meta = folder / "meta.json"
    if meta.is_file():
        try:
            raw["meta"].update(json.loads(meta.read_text()))
        except ValueError as e:
            raise DataError(f"{meta}: not valid JSON ({e})") from e
    raw["meta"].setdefault("source", str(folder.relative_to(item.root)))
    unknown = sorted(p.name for p in folder.iterdir() if p.name not in known)
    if unknown:
        raise DataError(
            f"{folder}: files {unknown} are not part of the layout for modalities {sorted(specs)} "
            f"(see `maestro shards convert folder --help`)"
        )
    return own.to_sample(raw, specs, item.split, f"{folder}: ")
