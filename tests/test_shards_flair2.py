"""FLAIR #2 conversion: the fixture tree (defects named or skipped), a generated, well-formed zone,
and the converted fixture feeding the loader built from configs/flair2.yaml with every preset input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from maestro import config
from maestro.data import build_loader
from maestro.errors import DataError
from shards import reader
from shards.convert import convert, geotiff

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flair2.yaml"


def test_flair2_fixture_converts_and_names_its_defects(fixtures_dir, tmp_path):
    root = fixtures_dir / "flair2" / "FLAIR2"
    with pytest.raises(DataError, match=r"SEN2_sp_D300_2013_Z19_PU_masks.npy: masks .* do not match data"):
        convert("flair2", root, str(tmp_path / "a"), splits=["train"])
    out = convert("flair2", root, str(tmp_path / "b"), skip_bad=True)
    assert {s: m["samples"] for s, m in out.items()} == {"train": 2, "test": 2}
    assert {k["sample"] for k in out["train"]["skipped"]} == {"IMG_222419", "IMG_291261"}
    zone = root / "flair_aerial_train" / "D346_2018" / "Z12_IE"
    sen = np.load(root / "flair_sen_train/D346_2018/Z12_IE/sen/SEN2_sp_D346_2018_Z12_IE_data.npy")
    for s in reader.iter_split(str(tmp_path / "b" / "train")):
        aerial = tifffile.imread(zone / "img" / f"{s.meta['id']}.tif").transpose(2, 0, 1)
        np.testing.assert_array_equal(s.arrays["aerial"][0], aerial[:4])  # R, G, B, NIR
        np.testing.assert_array_equal(s.arrays["dem"][0], aerial[4:])  # the nDSM band
        assert s.dates["dem"].tolist() == s.dates["aerial"].tolist()
        label = tifffile.imread(root / f"flair_labels_train/D346_2018/Z12_IE/msk/MSK_{s.meta['id'][4:]}.tif")
        np.testing.assert_array_equal(s.targets["cosia"], label)
        np.testing.assert_array_equal(s.arrays["s2"], sen[:, :, 11:21, 11:21])  # centroid (16, 16)
        assert s.dates["s2"][0].tolist() == [2021, 105, 10]  # products glued on one line, still parsed


def test_flair2_generated_zone(tmp_path):
    root = tmp_path / "FLAIR2"
    zone = "D013_2020/Z7_UA"
    rng = np.random.default_rng(0)
    t = 5
    data = rng.integers(0, 10000, (t, 10, 100, 90), dtype=np.uint16)
    masks = np.zeros((t, 2, 100, 90), np.uint8)
    masks[2, 1, 50:, :] = 80  # a cloud over the lower half on date 2
    sen = root / "flair_sen_train" / zone / "sen"
    sen.mkdir(parents=True)
    np.save(sen / "SEN2_sp_D013_2020-Z7_UA_data.npy", data)
    np.save(sen / "SEN2_sp_D013_2020-Z7_UA_masks.npy", masks)
    names = [f"S2B_MSIL2A_202003{10 + i}T103019_N0214_R108_T31TFJ_202003{10 + i}T134100" for i in range(t)]
    (sen / "SEN2_sp_D013_2020-Z7_UA_products.txt").write_text("\n".join(names) + "\n")
    centroids, metadata = {}, {}
    for k, (cy, cx) in enumerate([(50, 45), (95, 5)]):
        name = f"IMG_{k:06d}.tif"
        img = rng.integers(0, 255, (5, 64, 64), dtype=np.uint8)
        geotiff.write(
            root / "flair_aerial_train" / zone / "img" / name, img, 2154, (840000 + 13 * k, 6300000), 0.2
        )
        lab = rng.integers(1, 20, (1, 64, 64), dtype=np.uint8)
        geotiff.write(
            root / "flair_labels_train" / zone / "msk" / name.replace("IMG", "MSK"), lab, 2154, (0, 0), 0.2
        )
        centroids[name] = [cy, cx]
        metadata[f"IMG_{k:06d}"] = {"date": "2020-04-21", "time": "11h12"}
    (root / "flair-2_centroids_sp_to_patch.json").write_text(json.dumps(centroids))
    (root / "flair_aerial_metadata.json").write_text(json.dumps(metadata))
    out = convert("flair2", root, str(tmp_path / "out"))
    got = list(reader.iter_split(str(tmp_path / "out" / "train")))
    assert [s.meta["s2_window"] for s in got] == [[45, 40, 10], [90, 0, 10]]  # the second at the edges
    np.testing.assert_array_equal(got[1].arrays["s2"], data[:, :, 90:100, 0:10])
    assert got[0].arrays["s2"].dtype == np.uint16 and got[0].valid["s2"][2].mean() == 0.5  # rows 45-55
    assert got[0].dates["s2"][:, 1].tolist() == [70, 71, 72, 73, 74]
    assert got[0].meta["ref_date"] == [2020, 112, 0] and got[0].meta["crs"] == "EPSG:2154"
    assert got[0].meta["bounds"] == pytest.approx([840000, 6300000 - 12.8, 840000 + 12.8, 6300000])
    assert out["train"]["samples"] == 2


def test_converted_fixture_feeds_every_input_of_the_flair2_config(fixtures_dir, tmp_path):
    out = tmp_path / "shards"
    convert("flair2", fixtures_dir / "flair2" / "FLAIR2", str(out), skip_bad=True)
    tiny = [  # the fixture's 32-px aerial patches as the preset's 102.4 m tile, on one CPU worker
        f"data.shards={out / 'train'}",
        "data.modalities.aerial.resolution_m=3.2",
        "data.modalities.dem.resolution_m=3.2",
        "data.batch_size=2",
        "data.workers=0",
        "model.size=debug",
        "model.inter_depth=1",
        "run.workers=1",
        "run.use_gpu=false",
    ]
    cfg = config.load(CONFIG, tiny)
    assert cfg.data.dataset == "flair2" and list(cfg.derived.modalities) == ["aerial", "dem", "s2"]
    batch = next(iter(build_loader(cfg)))
    assert batch["aerial"].shape == (2, 1, 4, 32, 32)
    assert batch["dem"].shape == (2, 1, 1, 32, 32)
    assert batch["s2"].shape[:3] == (2, 16, 10) and batch["s2"].shape[3:] == (10, 10)
    assert float(batch["dem"].max()) <= 1.0  # nDSM / 255
