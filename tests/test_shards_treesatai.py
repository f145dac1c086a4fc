"""TreeSatAI-TS conversion: the real fixture samples come back exactly; bad input is named or skipped."""

from __future__ import annotations

import csv
import shutil

import h5py
import numpy as np
import pytest
import tifffile

from maestro.errors import DataError
from maestro.modalities import TREESAT_GENERA
from shards import reader
from shards.convert import convert
from shards.convert.dates import from_products
from shards.synth import SynthItem, read_item
from shards.synth_source import write_treesatai_source


@pytest.fixture(scope="module")
def converted(fixtures_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("treesat")
    manifests = convert("treesatai_ts", fixtures_dir / "treesatai_ts", str(out))
    return out, manifests


def test_real_samples_round_trip_exactly(converted, fixtures_dir):
    out, manifests = converted
    root = fixtures_dir / "treesatai_ts"
    assert {s: m["samples"] for s, m in manifests.items()} == {"train": 2, "val": 2, "test": 2}
    seen = 0
    for split in ("train", "val", "test"):
        rows = list(csv.DictReader((root / f"{split}.csv").read_text().splitlines()))
        for row, s in zip(rows, reader.iter_split(str(out / split)), strict=True):
            aerial = tifffile.imread(root / "aerial" / row["aerial_name"])  # (H, W, C)
            np.testing.assert_array_equal(s.arrays["aerial"][0], aerial.transpose(2, 0, 1))
            with h5py.File(root / "sentinel-ts" / row["sen_name"]) as f:
                for mod, name in (("s2", "sen-2"), ("s1_asc", "sen-1-asc"), ("s1_des", "sen-1-des")):
                    src = f[f"{name}-data"][()]
                    assert s.arrays[mod].dtype == src.dtype
                    np.testing.assert_array_equal(s.arrays[mod], src)  # NaNs included
                    products = [p.decode() for p in f[f"{name}-products"][()]]
                    np.testing.assert_array_equal(s.dates[mod], from_products(products, name))
                    assert s.meta["products"][mod] == products
                masks = f["sen-2-masks"][()]
            np.testing.assert_array_equal(s.valid["s2"], (masks <= 0).all(1))
            frac = np.array([float(row[g]) for g in TREESAT_GENERA])
            np.testing.assert_array_equal(s.targets["treesat_mlc_thresh"], frac > 0.07)
            np.testing.assert_array_equal(s.targets["treesat_mlc"], frac > 0)
            assert s.meta["ref_date"][1] == 182 and str(s.meta["ref_date"][0]) == row["aerial_date"][:4]
            assert s.meta["crs"] == "EPSG:25832" and len(s.meta["bounds"]) == 4
            seen += 1
    assert seen == 6


def test_real_quirks_survive(converted):
    out, _ = converted
    samples = {
        s.meta["id"]: s for split in ("train", "val", "test") for s in reader.iter_split(str(out / split))
    }
    betula = samples["Betula_spec._1_15679_WEFL_NLF"]
    assert np.isnan(betula.arrays["s1_des"]).sum() == 4
    assert betula.valid["s1_des"].sum() == betula.valid["s1_des"].size - 2  # 2 dates × 1 pixel
    d = betula.dates["s1_des"]
    assert (np.diff(d[:, 1]) == 0).any()  # same-day slices kept
    assert betula.dates["s2"][0].tolist() == [2019, 3, 10]  # S2A_MSIL2A_20190103T104431_…
    # Denormal cloud probabilities count as cloud (reference threshold 0).
    q = samples["Quercus_robur_3_86918_WEFL_NLF"]
    assert q.valid["s2"].mean() < 1


def test_synthetic_source_layout_converts_back(tmp_path):
    write_treesatai_source(tmp_path / "src", 3, seed=5, max_dates=20)
    convert("treesatai_ts", tmp_path / "src", str(tmp_path / "out"))
    got = list(reader.iter_split(str(tmp_path / "out" / "train")))
    for i, s in enumerate(got):
        direct = read_item(SynthItem("treesatai_ts", 5, i, "train", (), 20))
        for mod in direct.arrays:
            np.testing.assert_array_equal(s.arrays[mod], direct.arrays[mod])
            np.testing.assert_array_equal(s.dates[mod], direct.dates[mod])
        assert set(s.valid) == set(direct.valid)
        for mod in direct.valid:
            np.testing.assert_array_equal(s.valid[mod], direct.valid[mod])
        for name in direct.targets:
            np.testing.assert_array_equal(s.targets[name], direct.targets[name])
        assert s.meta["crs"] == "EPSG:25832" and s.meta["bounds"] == pytest.approx(direct.meta["bounds"])
    assert len(got) == 3


@pytest.fixture
def broken(fixtures_dir, tmp_path):
    """A copy of the real archive in tmp with one sample damaged by `damage(root)`."""
    root = tmp_path / "src"
    shutil.copytree(fixtures_dir / "treesatai_ts", root)
    return root


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


DAMAGES = {
    "missing": (lambda r: (r / "aerial" / "Quercus_robur_3_86918_WEFL_NLF.tif").unlink(), "missing"),
    "truncated": (
        lambda r: _truncate(r / "sentinel-ts" / "Quercus_robur_3_86918_WEFL_NLF_2019.h5"),
        "unreadable",
    ),
    "bands": (
        lambda r: tifffile.imwrite(
            r / "aerial" / "Quercus_robur_3_86918_WEFL_NLF.tif",
            np.zeros((8, 8, 3), np.uint8),
            photometric="rgb",
        ),
        "3 bands; expected 4",
    ),
    "date": (lambda r: _edit_csv(r / "train.csv", "aerial_date", "2019-13-45"), "not YYYYMMDD"),
    "label": (lambda r: _edit_csv(r / "train.csv", "Quercus", "lots"), "fractions must be numbers"),
}


def _edit_csv(path, column, value):
    rows = list(csv.DictReader(path.read_text().splitlines()))
    rows[1][column] = value
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_bad_input_is_named_and_skippable(broken, tmp_path, damage):
    fn, message = DAMAGES[damage]
    fn(broken)
    with pytest.raises(DataError, match=message) as e:
        convert("treesatai_ts", broken, str(tmp_path / "a"), splits=["train"])
    assert "Quercus_robur_3_86918" in str(e.value) or "train.csv line 3" in str(e.value)
    assert not (tmp_path / "a" / "train" / "manifest.json").exists()
    m = convert("treesatai_ts", broken, str(tmp_path / "b"), splits=["train"], skip_bad=True)["train"]
    assert m["samples"] == 1 and len(m["skipped"]) == 1
    assert (
        m["skipped"][0]["sample"] == "Quercus_robur_3_86918_WEFL_NLF" and message in m["skipped"][0]["reason"]
    )


def test_label_file_without_genus_columns(broken, tmp_path):
    rows = list(csv.reader((broken / "val.csv").read_text().splitlines()))
    with open(broken / "val.csv", "w", newline="") as f:
        csv.writer(f).writerows([r[:5] for r in rows])
    with pytest.raises(DataError, match=r"val.csv: label columns .*missing"):
        convert("treesatai_ts", broken, str(tmp_path / "o"), splits=["val"])
