"""Your own sensor's data: `shards.own.write_samples` and `maestro shards convert folder` write the
same validated split (arrays, dates, valid masks, labels, statistics) for a modality declared in a
config, and refuse bad samples naming the sample and the array."""

from __future__ import annotations

import csv
import datetime as dt

import numpy as np
import pytest
import yaml

from maestro import config
from maestro.cli import main
from maestro.errors import DataError
from maestro.modalities import preset
from shards import manifest as manifest_io
from shards import reader
from shards.convert import geotiff
from shards.own import write_samples

PLANET = {
    "bands": ["blue", "green", "red", "nir"],
    "resolution_m": 3.0,
    "image_size": 20,
    "patch_size": 4,
    "num_dates": 6,
    "norm_bands": [3, 1],
    "norm_fac": 10000,
    "dtype": "uint16",
}
RAW = {"data": {"dataset": "treesatai_ts", "inputs": ["planet", "s2"], "modalities": {"planet": PLANET}}}


def _samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t, ts2 = 3 + i % 2, 2
        valid = (rng.random((t, 20, 20)) > 0.1).astype(np.uint8)
        out.append(
            {
                "id": f"tile.{i:03d}",  # a dot: the key becomes tile_000, the id stays
                "arrays": {
                    "planet": rng.integers(0, 10000, (t, 4, 20, 20)).astype(np.uint16),
                    "s2": rng.normal(1000, 100, (ts2, 10, 6, 6)).astype(np.float32),
                },
                "dates": {
                    "planet": [[2021, 20 * k + 1, 10] for k in range(t)],
                    "s2": np.array([[2021, 100 + k, 10] for k in range(ts2)], np.int16),
                },
                "valid": {"planet": valid},
                "labels": {"crop": rng.integers(0, 5, (20, 20)).astype(np.uint8)},
                "meta": {"crs": "EPSG:32631", "bounds": [0, 0, 60, 60]},
            }
        )
    return out


def test_api_writes_a_user_modality_that_reads_back(tmp_path):
    cfg = config.from_dict(RAW)
    samples = _samples(5)
    m = write_samples(str(tmp_path), "train", cfg, iter(samples), shard_samples=2)
    assert m["samples"] == 5 and len(m["shards"]) == 3 and m["dataset"] == "treesatai_ts"
    assert m["modalities"]["planet"]["bands"] == PLANET["bands"]
    stats = m["statistics"]["modalities"]["planet"]
    assert list(stats) == PLANET["bands"]
    valid_values = sum(int(s["valid"]["planet"].sum()) for s in samples)
    assert stats["nir"]["count"] == valid_values  # statistics over valid pixels only
    expected = np.concatenate([s["arrays"]["planet"][:, 3][s["valid"]["planet"] == 1] for s in samples])
    assert stats["nir"]["mean"] == pytest.approx(expected.mean())
    got = list(reader.iter_split(str(tmp_path / "train")))
    for raw, s in zip(samples, got, strict=True):
        assert s.key == raw["id"].replace(".", "_") and s.meta["id"] == raw["id"]
        np.testing.assert_array_equal(s.arrays["planet"], raw["arrays"]["planet"])
        np.testing.assert_array_equal(s.dates["planet"], raw["dates"]["planet"])
        np.testing.assert_array_equal(s.valid["planet"], raw["valid"]["planet"])
        np.testing.assert_array_equal(s.targets["crop"], raw["labels"]["crop"])
        assert s.meta["crs"] == "EPSG:32631" and s.meta["split"] == "train"


def test_a_safe_cast_is_applied_and_a_preset_modality_works_from_a_spec_dict(tmp_path):
    s2 = preset("treesatai_ts").modalities["s2"]
    x = np.arange(2 * 10 * 6 * 6, dtype=np.int16).reshape(2, 10, 6, 6)  # int16 -> float32 is safe
    sample = {"id": "a", "arrays": {"s2": x}, "dates": {"s2": [[2020, 1, 0], [2020, 366, 23]]}}
    m = write_samples(str(tmp_path), "val", {"s2": s2}, [sample])
    (got,) = reader.iter_split(str(tmp_path / "val"))
    assert got.arrays["s2"].dtype == np.float32 and m["dataset"] == "own"
    np.testing.assert_array_equal(got.arrays["s2"], x)


def _bad(mutate) -> dict:
    s = _samples(1)[0]
    mutate(s)
    return s


BAD = [
    (lambda s: s["arrays"].update(planet=s["arrays"]["planet"][:, :3]), "'planet': 3 channels; modality 'planet' has 4"),
    (lambda s: s["arrays"].update(planet=s["arrays"]["planet"][0]), r"'planet': shape \(4, 20, 20\); expected \(T, C, H, W\)"),
    (lambda s: s["arrays"].update(planet=s["arrays"]["planet"].astype(np.float64)), "dtype float64 does not fit the modality's dtype uint16; set data.modalities.planet.dtype"),
    (lambda s: s["arrays"]["s2"].fill(np.nan), "'s2': every value is NaN"),
    (lambda s: s["arrays"].update(planet=s["arrays"]["planet"][:0]), r"'planet': shape \(0, 4, 20, 20\); expected \(T, C, H, W\) with T >= 1"),
    (lambda s: s["dates"]["planet"].__setitem__(1, [2021, 400, 10]), r"dates\['planet'\]: row 1 \[2021, 400, 10\] has day_of_year 400; expected 1-366"),
    (lambda s: s["dates"]["planet"].pop(), r"dates\['planet'\]: shape \(2, 3\); expected \(3, 3\)"),
    (lambda s: s["dates"].pop("s2"), "no dates for 's2'"),
    (lambda s: s["arrays"].pop("s2"), r"modalities \['s2'\] missing"),
    (lambda s: s["arrays"].update(lidar=np.zeros((1, 1, 2, 2))), r"modalities \['lidar'\] are not in the config's"),
    (lambda s: s["valid"].update(planet=s["valid"]["planet"][:, :5]), r"valid\['planet'\]: shape \(3, 5, 20\); expected \(3, 20, 20\)"),
    (lambda s: s.update(extra=1), r"unknown keys \['extra'\]"),
    (lambda s: s["meta"].update(when=dt.date(2021, 1, 1)), "'meta' must hold JSON values"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "message"), BAD)
def test_bad_samples_are_refused_naming_sample_and_array(mutate, message, tmp_path):
    cfg = config.from_dict(RAW)
    with pytest.raises(DataError, match=message) as e:
        write_samples(str(tmp_path), "train", cfg, [_bad(mutate)])
    assert "sample 'tile.000'" in str(e.value) or "unknown keys" in str(e.value)
    assert not (tmp_path / "train" / "manifest.json").exists()


def test_skip_bad_lists_the_refused_samples(tmp_path):
    good = _samples(3)
    good[1]["dates"]["s2"] = [[2021, 0, 10], [2021, 1, 10]]
    m = write_samples(str(tmp_path), "train", config.from_dict(RAW), good, skip_bad=True)
    assert m["samples"] == 2
    assert [k["sample"] for k in m["skipped"]] == ["tile.001"] and "day_of_year 0" in m["skipped"][0][
        "reason"
    ]


def _folder_layout(root, samples, tif: bool) -> None:
    """The `folder` converter's layout for `samples` (planet as GeoTIFF when `tif`)."""
    for s in samples:
        d = root / "train" / s["id"]
        d.mkdir(parents=True)
        for mod, x in s["arrays"].items():
            if tif and mod == "planet":
                stacked = x.reshape(-1, *x.shape[2:])  # (T*C, H, W), date-major
                geotiff.write(d / "planet.tif", stacked, 32631, (500000.0, 4000060.0), 3.0)
            else:
                np.save(d / f"{mod}.npy", x)
            with open(d / f"{mod}.dates.csv", "w", newline="") as f:
                w = csv.writer(f)
                if mod == "planet":  # the ISO-date form
                    w.writerow(["date", "hour"])
                    for y, doy, h in np.asarray(s["dates"][mod]).tolist():
                        w.writerow([(dt.date(y, 1, 1) + dt.timedelta(doy - 1)).isoformat(), h])
                else:
                    w.writerow(["year", "day_of_year", "hour"])
                    w.writerows(np.asarray(s["dates"][mod]).tolist())
        np.save(d / "planet.valid.npy", s["valid"]["planet"])
        np.save(d / "crop.label.npy", s["labels"]["crop"])
        (d / "meta.json").write_text('{"crs": "EPSG:32631", "bounds": [0, 0, 60, 60]}')


def test_folder_converter_gives_the_api_s_shards(tmp_path):
    cfg_path = tmp_path / "planet.yaml"
    cfg_path.write_text(yaml.safe_dump(RAW))
    samples = _samples(4)
    _folder_layout(tmp_path / "src", samples, tif=False)
    assert main(["shards", "convert", "folder", str(tmp_path / "src"), str(tmp_path / "a"),
                 "--config", str(cfg_path), "--shard-samples", "2"]) == 0  # fmt: skip
    api = write_samples(str(tmp_path / "b"), "train", str(cfg_path), samples, shard_samples=2)
    conv = manifest_io.read(str(tmp_path / "a" / "train"))
    got = {s.key: s for s in reader.iter_split(str(tmp_path / "a" / "train"))}
    want = {s.key: s for s in reader.iter_split(str(tmp_path / "b" / "train"))}
    assert sorted(got) == sorted(want) == ["tile_000", "tile_001", "tile_002", "tile_003"]
    for k, s in got.items():
        for mod in ("planet", "s2"):
            np.testing.assert_array_equal(s.arrays[mod], want[k].arrays[mod])
            np.testing.assert_array_equal(s.dates[mod], want[k].dates[mod])
        np.testing.assert_array_equal(s.valid["planet"], want[k].valid["planet"])
        np.testing.assert_array_equal(s.targets["crop"], want[k].targets["crop"])
    assert conv["statistics"]["modalities"] == api["statistics"]["modalities"]


def test_folder_converter_reads_geotiff_series_and_names_stray_files(tmp_path):
    cfg = config.from_dict(RAW)
    samples = _samples(2)
    _folder_layout(tmp_path / "src", samples, tif=True)
    from shards.convert import convert

    m = convert("folder", tmp_path / "src", str(tmp_path / "out"), config=cfg)["train"]
    got = list(reader.iter_split(str(tmp_path / "out" / "train")))
    np.testing.assert_array_equal(got[1].arrays["planet"], samples[1]["arrays"]["planet"])
    assert got[1].meta["crs"] == "EPSG:32631" and m["samples"] == 2
    (tmp_path / "src" / "train" / samples[0]["id"] / "planet_dates.csv").write_text("")
    with pytest.raises(DataError, match=r"files \['planet_dates.csv'\] are not part of the layout"):
        convert("folder", tmp_path / "src", str(tmp_path / "o2"), config=cfg)
    (tmp_path / "src" / "train" / samples[0]["id"] / "planet_dates.csv").unlink()
    (tmp_path / "src" / "train" / samples[0]["id"] / "s2.dates.csv").unlink()
    with pytest.raises(DataError, match=r"s2.dates.csv: missing"):
        convert("folder", tmp_path / "src", str(tmp_path / "o3"), config=cfg)


def test_own_geometry_keys_replace_the_preset_s_and_are_checked():
    own = {"tile_m": 96.0, "crop_m": 48.0, "ref_date": "planet", "inputs": ["planet"]}
    cfg = config.from_dict({"data": {**RAW["data"], **own}})
    assert (cfg.derived.tile_m, cfg.derived.crop_m, cfg.derived.ref_date) == (96.0, 48.0, "planet")
    assert config.from_dict(RAW).derived.tile_m == preset("treesatai_ts").tile_m  # 0: the preset's
    with pytest.raises(
        config.ConfigError, match=r"'data.ref_date': got 'lidar'; expected one of the inputs \['planet'\]"
    ):
        config.from_dict({"data": {**RAW["data"], **own, "ref_date": "lidar"}})
    assert (
        config.from_dict({"data": {**RAW["data"], **own, "ref_date": "2021-07-01"}}).derived.ref_date
        == "2021-07-01"
    )
    with pytest.raises(
        config.ConfigError, match=r"'data.crop_m': got 200.0; expected a crop side in \(0, tile_m=96.0\]"
    ):
        config.from_dict({"data": {**RAW["data"], **own, "crop_m": 200.0}})
