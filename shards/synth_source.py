"""A synthetic TreeSatAI-TS archive in the dataset's own file layout (not shards).

`aerial/NAME.tif` GeoTIFFs, `sentinel-ts/NAME_YEAR.h5` with the S1/S2 series, masks and product
names, and `{split}.csv` with genus fractions, as the real archive (datasets.md §4.1). The pixels
are those of `shards.synth` for the same seed, so converting this archive gives the synthetic
shards back, and per-file reads of it can be compared with shard streaming.
"""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import h5py
import numpy as np

from maestro.errors import DataError
from maestro.modalities import TREESAT_GENERA
from shards.convert import geotiff
from shards.convert.treesatai_ts import H5
from shards.synth import SynthItem, make_scene

PRESET = "treesatai_ts"


def product_names(dates: np.ndarray, sensor: str) -> list[str]:
    """Sentinel product names carrying each (year, doy, hour) as sensing time in field -5."""
    out = []
    for i, (year, doy, hour) in enumerate(dates.tolist()):
        d = (dt.date(year, 1, 1) + dt.timedelta(days=doy - 1)).strftime("%Y%m%d")
        stamp = f"{d}T{hour:02d}{i % 60:02d}00"
        if sensor == "s2":
            out.append(f"S2A_MSIL2A_{stamp}_N0211_R008_T32UMD_{d}T115449")
        else:
            out.append(f"S1A_IW_GRDH_1SDV_{stamp}_{d}T{hour:02d}{i % 60:02d}25_025287_02CC09_{i:04d}")
    return out


def write_treesatai_source(
    out_dir: str | Path,
    samples: int,
    seed: int = 0,
    *,
    split: str = "train",
    max_dates: int | None = None,
    overwrite: bool = False,
) -> int:
    """Write `samples` synthetic samples and `{split}.csv` under a local folder; returns bytes written."""
    out = Path(out_dir)
    csv_path = out / f"{split}.csv"
    if csv_path.exists() and not overwrite:
        raise DataError(
            f"{csv_path}: exists; refusing to overwrite it. Pass --overwrite or choose another OUT"
        )
    (out / "sentinel-ts").mkdir(parents=True, exist_ok=True)
    rows, nbytes = [], 0
    for i in range(samples):
        scene = make_scene(SynthItem(PRESET, seed, i, split, (), max_dates))
        main = TREESAT_GENERA[int(scene.fractions.argmax())]
        stem = f"{main}_synth_{seed}_{split}_{i:07d}_WEFL_NLF"
        aerial = out / "aerial" / f"{stem}.tif"
        geotiff.write(aerial, scene.arrays["aerial"][0], 25832, (scene.bounds[0], scene.bounds[3]), 0.2)
        h5_path = out / "sentinel-ts" / f"{stem}_{scene.year}.h5"
        with h5py.File(h5_path, "w") as f:
            for mod, name in H5.items():
                f[f"{name}-data"] = scene.arrays[mod]
                names = product_names(scene.dates[mod], "s2" if mod == "s2" else "s1")
                f.create_dataset(f"{name}-products", data=np.array(names, dtype=h5py.string_dtype()))
            f["sen-2-masks"] = scene.masks["s2"]
        nbytes += aerial.stat().st_size + h5_path.stat().st_size
        rows.append([aerial.name, h5_path.name, f"{scene.year}0701", *map(repr, scene.fractions.tolist())])
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["aerial_name", "sen_name", "aerial_date", *TREESAT_GENERA])
        w.writerows(rows)
    return nbytes
