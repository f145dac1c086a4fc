"""Date policies, scaling and crops against the reference: the real TreeSatAI-TS fixture and toy inputs."""

from __future__ import annotations

import datetime
import json

import h5py
import numpy as np
import pytest
import tifffile

from maestro import config
from maestro.data.dates import draw_offset, select_bins
from maestro.data.geometry import geometry
from maestro.data.prepare import Recipe, modality_item, prepare
from maestro.data.transforms import missing_values, scale
from maestro.modalities import ModalitySpec, preset
from shards.schema import Sample

H5_KEYS = {"s2": "sen-2", "s1_asc": "sen-1-asc", "s1_des": "sen-1-des"}


def _doy(products) -> np.ndarray:
    """(T, 3) rows (year, day of year, 0) from product names (the 5th '_' field from the end)."""
    out = []
    for p in products:
        s = p.decode().split("_")[-5][:8]
        d = datetime.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
        out.append([d.year, d.timetuple().tm_yday, 0])
    return np.array(out, dtype=np.int16)


def _series(fixtures_dir, sen_name: str, mod: str):
    with h5py.File(fixtures_dir / "treesatai_ts" / "sentinel-ts" / sen_name) as f:
        x = f[f"{H5_KEYS[mod]}-data"][:]
        dates = _doy(f[f"{H5_KEYS[mod]}-products"][:])
        cloudy = (f["sen-2-masks"][:] > 0).any(axis=1) if mod == "s2" else None
    return x, dates, cloudy


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    ref = fixtures_dir / "reference_model" / "treesatai_ts_tiny"
    meta = json.loads((ref / "meta.json").read_text())["batch"]
    return meta, dict(np.load(ref / "batch.npz"))


def test_bins_golden_days_of_year(fixtures_dir):
    """maestro_reference.md §6.3: eval-mode choice per offset on the real Betula sample."""
    x, dates, cloudy = _series(fixtures_dir, "Betula_spec._1_15679_WEFL_NLF_2019.h5", "s2")
    golden = {
        0: [23, 40, 58, 88, 105, 133, 158, 180, 190, 205, 238, 265, 278, 303, 330, 348],
        1: [23, 48, 55, 88, 105, 138, 158, 168, 205, 208, 238, 265, 278, 303, 340, 348],
        2: [23, 48, 55, 88, 105, 138, 158, 168, 208, 215, 238, 265, 278, 303, 335, 348],
    }
    for offset, doy in golden.items():
        assert dates[select_bins(x, cloudy, 16, offset).index, 1].tolist() == doy
    x, dates, _ = _series(fixtures_dir, "Betula_spec._1_15679_WEFL_NLF_2019.h5", "s1_asc")
    assert dates[select_bins(x, None, 4, 0).index, 1].tolist() == [49, 109, 241, 302]
    x, dates, _ = _series(fixtures_dir, "Betula_spec._1_15679_WEFL_NLF_2019.h5", "s1_des")
    assert np.isnan(x).any()  # the real NaNs (dates 61-62) are never chosen
    sel = select_bins(x, None, 4, 0)
    assert dates[sel.index, 1].tolist() == [70, 142, 231, 328]
    assert not np.isnan(x[sel.index]).any()


def test_bins_and_scaling_reproduce_the_reference_batch(fixtures_dir, reference):
    """Selected dates and scaled values equal the reference loader's batch, with its drawn offsets."""
    meta, batch = reference
    specs = preset("treesatai_ts").modalities
    for b, sample in enumerate(meta["samples"]):
        for mod in ("s2", "s1_asc", "s1_des"):
            x, dates, cloudy = _series(fixtures_dir, sample["sen_name"], mod)
            sel = select_bins(x, cloudy, specs[mod].num_dates, sample["bin_offsets_drawn"][mod])
            assert dates[sel.index].tolist() == sample["selected_dates"][mod]
            np.testing.assert_array_equal(dates[sel.index], batch[f"{mod}_dates"][b])
            np.testing.assert_allclose(scale(x[sel.index], specs[mod]), batch[mod][b], rtol=1e-6, atol=1e-6)
    aerial = tifffile.imread(fixtures_dir / "treesatai_ts" / "aerial" / meta["samples"][0]["aerial_name"])
    aerial = aerial.transpose(2, 0, 1)[None]  # (1, C, H, W)
    g = geometry(specs, 60.0, 60.0)
    rows, cols = g.window(g.sizes["aerial"], (0, 0), specs["aerial"].shift_px)
    assert (rows.start, rows.stop) == (2, 302)
    np.testing.assert_allclose(
        scale(aerial[:, :, rows, cols], specs["aerial"]), batch["aerial"][0], atol=1e-7
    )


def test_prepare_real_sample_eval_and_train(fixtures_dir):
    """The whole per-sample path on the real sample: shapes, no NaN, flags, clear dates in training."""
    arrays, dates, valid = {}, {}, {}
    for mod in H5_KEYS:
        x, d, cloudy = _series(fixtures_dir, "Betula_spec._1_15679_WEFL_NLF_2019.h5", mod)
        arrays[mod], dates[mod] = x, d
        if cloudy is not None:
            valid[mod] = (~cloudy).astype(np.uint8)
    aerial = tifffile.imread(fixtures_dir / "treesatai_ts" / "aerial" / "Betula_spec._1_15679_WEFL_NLF.tif")
    arrays["aerial"], dates["aerial"] = aerial.transpose(2, 0, 1)[None], np.array([[2019, 182, 0]], np.int16)
    sample = Sample("betula", arrays, dates, valid)
    cfg = config.from_dict({})
    for train in (False, True):
        recipe = Recipe.from_config(cfg, train)
        (item,) = prepare(sample, recipe, np.random.default_rng(0), "test")
        assert item["aerial"].shape == (1, 4, 300, 300) and item["s2"].shape == (16, 10, 6, 6)
        assert item["s1_des"].shape == (4, 2, 6, 6) and item["ref_date"].tolist() == [[2019, 182, 0]]
        for mod in H5_KEYS:
            assert np.isfinite(item[mod]).all() and item[f"{mod}_dates"].dtype == np.int16
        clear_bins = [0, 2, 3, 1, 6, 3, 3, 7, 0, 2, 4, 4, 1, 1, 0, 1]  # §6.3, offset 0
        if train:  # a random clear date wherever the bin has one (the offset may shift bins by <= 2)
            assert item["s2_valid"].all(axis=(1, 2)).sum() >= sum(c > 0 for c in clear_bins) - 2


def test_fewer_dates_than_bins_are_padded_and_flagged():
    spec = ModalitySpec(bands=["a", "b"], resolution_m=10, image_size=4, patch_size=2, num_dates=4)
    x = np.arange(2 * 2 * 4 * 4, dtype=np.float32).reshape(2, 2, 4, 4)
    sel = select_bins(x, None, 4, draw_offset(2, 4, np.random.default_rng(0)))
    assert sel.index.tolist() == [0, 1, -1, -1]
    acq = np.array([[2020, 1, 0], [2020, 9, 0]], np.int16)
    values, d, valid = modality_item(x, acq, None, spec, None, False)
    assert d[:2].tolist() == acq.tolist()
    assert (
        values.shape == (4, 2, 4, 4) and (values[2:] == 0).all() and not valid[2:].any() and valid[:2].all()
    )
    none = modality_item(x[:0], acq[:0], None, spec, None, False)
    assert none[0].shape == (4, 2, 4, 4) and not none[2].any()


def test_bin_without_complete_date_keeps_the_least_missing():
    x = np.ones((8, 1, 2, 2), np.float32)
    x[:4, 0, 0, 0] = np.nan  # bin 0: every date has a hole
    x[0, 0, 1, 1] = np.nan  # date 0 has two
    sel = select_bins(x, None, 2, 0)
    assert sel.index[0] == 1 and 4 <= sel.index[1] < 8


def test_scaling_log_norm_elevation_and_nodata():
    s1 = ModalitySpec(
        bands=["VV", "VH"], resolution_m=10, image_size=2, patch_size=1, norm_fac=5.0, log_scale=True
    )
    x = np.array([1.0, 0.0], np.float32).reshape(1, 2, 1, 1)
    np.testing.assert_allclose(scale(x, s1).ravel(), [0.0, np.log(1e-10) / 5], rtol=1e-6)
    dem = ModalitySpec(
        bands=["dsm", "dtm"], resolution_m=1, image_size=2, patch_size=1, norm_fac=1000.0, rescale_elev=True
    )
    x = np.array([120.0, 100.0], np.float32).reshape(1, 2, 1, 1)
    np.testing.assert_allclose(scale(x, dem).ravel(), [0.12, 30 * (0.12 - 0.1)], rtol=1e-5)
    nod = ModalitySpec(bands=["a"], resolution_m=1, image_size=2, patch_size=1, nodata=-9999.0)
    assert missing_values(np.array([[[[1.0, -9999.0]]]], np.float32), nod).tolist() == [[[False, True]]]


def test_crop_grids_follow_the_preset_geometry():
    p = preset("pastis_hd")
    g = geometry(p.modalities, p.tile_m, p.crop_m)
    assert (g.cells, g.crop_cells, len(g.origins)) == (128, 16, 64)
    rows, cols = g.window(g.sizes["spot"], g.origins[-1])
    assert (rows.start, rows.stop, cols.stop) == (1120, 1280, 1280)
    rng = np.random.default_rng(0)
    for _ in range(20):
        i, j = g.random_origin(rng)
        assert 0 <= i <= 112 and 0 <= j <= 112
    n = preset("s2_naip")
    assert len(geometry(n.modalities, n.tile_m, n.crop_m).origins) == 25
