"""PASTIS-R / PASTIS-HD conversion from the fixture arrays and the real PASTIS-HD metadata excerpt."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from maestro.errors import DataError
from shards import reader
from shards.convert import convert, geotiff
from shards.verify import verify


def _dates(n: int, start: dt.date) -> dict[str, int]:
    return {str(i): int((start + dt.timedelta(days=5 * i)).strftime("%Y%m%d")) for i in range(n)}


@pytest.fixture
def pastis_r(fixtures_dir, tmp_path):
    """The fixture's arrays (symlinked) with a metadata.geojson that has the date dictionaries."""
    src = fixtures_dir / "pastis" / "PASTIS-R"
    root = tmp_path / "PASTIS-HD"
    root.mkdir()
    for d in ("DATA_S2", "DATA_S1A", "DATA_S1D", "ANNOTATIONS", "INSTANCE_ANNOTATIONS"):
        (root / d).symlink_to(src / d)
    features = []
    for f in json.loads((src / "metadata.geojson").read_text())["features"]:
        i = f["properties"]["ID_PATCH"]
        for key, prefix in (
            ("dates-S2", "DATA_S2/S2"),
            ("dates-S1A", "DATA_S1A/S1A"),
            ("dates-S1D", "DATA_S1D/S1D"),
        ):
            t = np.load(src / f"{prefix}_{i}.npy").shape[0]
            f["properties"][key] = _dates(t, dt.date(2018, 9, 24))
        features.append(f)
    (root / "metadata.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    spot = root / "DATA_SPOT" / "PASTIS_SPOT6_RVB_1M00_2019" / "SPOT6_RVB_1M00_2019_0.tif"
    geotiff.write(
        spot, np.arange(3 * 40 * 40, dtype=np.uint8).reshape(3, 40, 40), 2154, (600000, 6800000), 1.0
    )
    return root


def test_pastis_fixture_arrays_round_trip(pastis_r, fixtures_dir, tmp_path):
    src = fixtures_dir / "pastis" / "PASTIS-R"
    out = convert("pastis", pastis_r, str(tmp_path / "out"))
    assert sorted(out) == ["fold1", "fold2", "fold3", "fold4", "fold5"]
    assert sum(m["samples"] for m in out.values()) == 5
    meta = json.loads((pastis_r / "metadata.geojson").read_text())["features"]
    for split in out:
        for s in reader.iter_split(str(tmp_path / "out" / split)):
            i = int(s.meta["id"])
            props = next(f["properties"] for f in meta if f["properties"]["ID_PATCH"] == i)
            for mod, prefix, key in (
                ("s2", "DATA_S2/S2", "dates-S2"),
                ("s1_des", "DATA_S1D/S1D", "dates-S1D"),
            ):
                raw = np.load(src / f"{prefix}_{i}.npy")
                assert s.arrays[mod].dtype == raw.dtype
                np.testing.assert_array_equal(s.arrays[mod], raw)
                first = dt.datetime.strptime(str(props[key]["0"]), "%Y%m%d").date()
                assert s.dates[mod][0].tolist() == [first.year, first.timetuple().tm_yday, 0]
            np.testing.assert_array_equal(
                s.targets["pastis_seg"], np.load(src / f"ANNOTATIONS/TARGET_{i}.npy")[0]
            )
            assert ("spot" in s.arrays) == (i == 0)
        assert verify(str(tmp_path / "out" / split))["ok"]


def test_pastis_torchgeo_metadata_without_dates_is_named(fixtures_dir, tmp_path):
    with pytest.raises(DataError, match=r"ID_PATCH=\d: no 'dates-S2' date dictionary"):
        convert("pastis", fixtures_dir / "pastis" / "PASTIS-R", str(tmp_path / "o"), splits=["fold1"])


def test_pastis_hd_real_metadata_dates(fixtures_dir, tmp_path):
    """Real date dictionaries (0-based keys) from the PASTIS-HD excerpt, with arrays of matching length."""
    root = tmp_path / "hd"
    (root / "DATA_S2").mkdir(parents=True)
    (root / "ANNOTATIONS").mkdir()
    text = (fixtures_dir / "pastis_hd_metadata" / "metadata.geojson").read_text()
    (root / "metadata.geojson").write_text(text)
    features = json.loads(text)["features"]
    rng = np.random.default_rng(0)
    for f in features:
        i, t = f["properties"]["ID_PATCH"], len(f["properties"]["dates-S2"])
        np.save(root / "DATA_S2" / f"S2_{i}.npy", rng.integers(0, 9000, (t, 10, 8, 8), dtype=np.int16))
        np.save(root / "ANNOTATIONS" / f"TARGET_{i}.npy", rng.integers(0, 20, (3, 8, 8), dtype=np.uint8))
    out = convert("pastis", root, str(tmp_path / "out"))
    got = [s for split in out for s in reader.iter_split(str(tmp_path / "out" / split))]
    assert len(got) == len(features) == 4
    for s in got:
        props = next(f["properties"] for f in features if str(f["properties"]["ID_PATCH"]) == s.meta["id"])
        want = [dt.datetime.strptime(str(props["dates-S2"][str(k)]), "%Y%m%d").date() for k in range(43)]
        assert s.dates["s2"].tolist() == [[d.year, d.timetuple().tm_yday, 0] for d in want]
        assert (
            set(s.arrays) == {"s2"}
            and s.meta["crs"] == "EPSG:2154"
            and s.meta["properties"]["TILE"] == "t30uxv"
        )
        assert s.meta["bounds"][0] < s.meta["bounds"][2]


def test_pastis_wrong_date_count_is_named(pastis_r, tmp_path):
    path = pastis_r / "metadata.geojson"
    data = json.loads(path.read_text())
    data["features"][0]["properties"]["dates-S2"].pop("0")
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="ID_PATCH=0 'dates-S2': date keys"):
        convert("pastis", pastis_r, str(tmp_path / "o"), splits=["fold1"])
    m = convert("pastis", pastis_r, str(tmp_path / "p"), splits=["fold2"], skip_bad=True)
    assert m["fold2"]["samples"] == 1 and m["fold2"]["skipped"] == []
    with pytest.raises(
        DataError, match=r"fold1: no sample was written \(1 skipped\)"
    ):  # fold1 = patch 0 only
        convert("pastis", pastis_r, str(tmp_path / "q"), splits=["fold1"], skip_bad=True)
