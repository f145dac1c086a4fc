"""FLAIR-HUB conversion: the real toy split CSV rows, with imagery and date tables generated in tmp."""

from __future__ import annotations

import csv
import json
import sqlite3

import numpy as np
import pytest

from maestro.errors import DataError
from shards import reader
from shards.convert import convert, geotiff
from shards.verify import verify

BANDS = {
    "AERIAL_RGBI": (4, 16, np.uint8),
    "DEM_ELEV": (2, 16, np.float32),
    "SPOT_RGBI": (4, 4, np.uint16),
    "SENTINEL2_TS": (10, 2, np.uint16),
    "SENTINEL2_MSK-SC": (2, 2, np.uint8),
    "SENTINEL1-ASC_TS": (2, 2, np.float32),
    "SENTINEL1-DESC_TS": (2, 2, np.float32),
    "AERIAL_LABEL-COSIA": (1, 16, np.uint8),
    "ALL_LABEL-LPIS": (3, 16, np.uint8),
    "AERIAL-RLT_PAN": (1, 16, np.uint8),
}
T = {"SENTINEL2": 5, "SENTINEL1-ASC": 3, "SENTINEL1-DESC": 4}


def _gpkg(path, column, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE gpkg_contents (table_name TEXT, data_type TEXT)")
        db.execute("INSERT INTO gpkg_contents VALUES ('dates', 'attributes')")
        db.execute(f"CREATE TABLE dates (fid INTEGER PRIMARY KEY, patch_id TEXT, {column} TEXT)")
        db.executemany(f"INSERT INTO dates (patch_id, {column}) VALUES (?, ?)", rows)


@pytest.fixture
def hub(fixtures_dir, tmp_path):
    """The first 3 rows of the real toy TRAIN CSV, with every file they name generated."""
    root = tmp_path / "FLAIR-HUB"
    (root / "csv").mkdir(parents=True)
    lines = (fixtures_dir / "flair_hub" / "csv" / "FLAIR-HUB_TOY-DATASET_TRAIN.csv").read_text().splitlines()
    (root / "csv" / "FLAIR-HUB_TOY-DATASET_TRAIN.csv").write_text("\n".join(lines[:4]) + "\n")
    rows = list(csv.DictReader(lines[:4]))
    rng = np.random.default_rng(0)
    for row in rows:
        for column, (c, size, dtype) in BANDS.items():
            t = T.get(column.split("_")[0], 1) if "_TS" in column or "MSK" in column else 1
            x = (rng.random((t * c, size, size)) * 200).astype(dtype)
            geotiff.write((root / "csv" / row[column]).resolve(), x, 2154, (700000.0, 6600000.0), 0.2)
    mtd = root / "GLOBAL_ALL_MTD"
    for sensor, t in T.items():
        d = {str(k + 1): f"2020{3 + k:02d}15" for k in range(t)}
        # Per ROI for S2 (as MAESTRO keys them), per patch for S1.
        keys = {
            "_".join(r["patch_id"].split("_")[:2]) if sensor == "SENTINEL2" else r["patch_id"] for r in rows
        }
        _gpkg(
            mtd / f"GLOBAL_{sensor}_MTD_DATES.gpkg", "acquisition_dates", [(k, json.dumps(d)) for k in keys]
        )
    _gpkg(mtd / "GLOBAL_AERIAL_MTD_DATES.gpkg", "date", [(r["patch_id"], "20200600") for r in rows])
    _gpkg(mtd / "GLOBAL_SPOT_MTD_DATES.gpkg", "date", [(r["patch_id"], "20200917") for r in rows])
    return root, rows


def test_flair_hub_round_trip(hub, tmp_path):
    root, rows = hub
    out = convert("flair_hub", root, str(tmp_path / "out"))
    assert list(out) == ["train"] and out["train"]["samples"] == 3
    got = list(reader.iter_split(str(tmp_path / "out" / "train")))
    for row, s in zip(rows, got, strict=True):
        assert s.meta["id"] == row["patch_id"]
        s2, _, _ = geotiff.read((root / "csv" / row["SENTINEL2_TS"]).resolve())
        assert s.arrays["s2"].shape == (5, 10, 2, 2) and s.arrays["s2"].dtype == np.uint16
        np.testing.assert_array_equal(s.arrays["s2"][3, 7], s2[3 * 10 + 7])  # T×C band stacking undone
        assert s.arrays["s1_des"].shape == (4, 2, 2, 2)
        assert s.dates["s2"][:, 1].tolist() == [75, 106, 136, 167, 197]  # 2020-03-15 …
        assert s.dates["aerial"].tolist() == [[2020, 153, 0]]  # day 00 read as 01
        assert s.arrays["dem"].dtype == np.float32 and s.arrays["spot"].shape == (1, 4, 4, 4)
        assert s.valid["s2"].shape == (5, 2, 2) and s.targets["lpis"].shape == (3, 16, 16)
        assert s.targets["cosia"].shape == (16, 16) and s.meta["crs"] == "EPSG:2154"
        assert "AERIAL-RLT_PAN" not in s.meta["source"]
    assert verify(str(tmp_path / "out" / "train"))["ok"]


def test_flair_hub_band_count_mismatch_is_named(hub, tmp_path):
    root, rows = hub
    bad = (root / "csv" / rows[1]["SENTINEL1-ASC_TS"]).resolve()
    geotiff.write(bad, np.zeros((5, 2, 2), np.float32), 2154, (0, 0), 10.0)
    with pytest.raises(DataError, match=r"5 bands for 3 dates × 2 channels"):
        convert("flair_hub", root, str(tmp_path / "a"))
    m = convert("flair_hub", root, str(tmp_path / "b"), skip_bad=True)["train"]
    assert m["samples"] == 2 and m["skipped"][0]["sample"] == rows[1]["patch_id"]
