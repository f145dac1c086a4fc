"""The registry's dataset presets against the reference tables (maestro_reference.md §4, §4.5)."""

from __future__ import annotations

import json

import pytest

from maestro import config
from maestro.errors import ConfigError
from maestro.modalities import PRESETS, ModalitySpec, pixels, preset, validate_modality

# (dataset, modality): (loader tensor (N, C, h, w), grid g, tokens, group, norm groups, norm_fac, log)
REFERENCE = {
    ("treesatai_ts", "aerial"): ((1, 4, 300, 300), 15, 225, "aerial", [1, 3], 255, False),
    ("treesatai_ts", "s2"): ((16, 10, 6, 6), 3, 144, "s2", [4, 4, 2], 5000, False),
    ("treesatai_ts", "s1_asc"): ((4, 2, 6, 6), 3, 36, "s1", [1, 1], 5, True),
    ("treesatai_ts", "s1_des"): ((4, 2, 6, 6), 3, 36, "s1", [1, 1], 5, True),
    ("pastis_hd", "spot"): ((1, 3, 160, 160), 10, 100, "spot", [3], 255, False),
    ("pastis_hd", "s2"): ((16, 10, 16, 16), 8, 1024, "s2", [4, 4, 2], 10000, False),
    ("pastis_hd", "s1_asc"): ((4, 2, 16, 16), 8, 256, "s1", [1, 1], 20, False),
    ("pastis_hd", "s1_des"): ((4, 2, 16, 16), 8, 256, "s1", [1, 1], 20, False),
    ("flair_hub", "aerial"): ((1, 4, 512, 512), 32, 1024, "aerial", [1, 3], 255, False),
    ("flair_hub", "dem"): ((1, 2, 512, 512), 16, 256, "dem", [2], 1000, False),
    ("flair_hub", "s2"): ((16, 10, 10, 10), 5, 400, "s2", [4, 4, 2], 5000, False),
    ("flair_hub", "s1_asc"): ((4, 2, 10, 10), 5, 100, "s1", [1, 1], 5, True),
    ("flair_hub", "s1_des"): ((4, 2, 10, 10), 5, 100, "s1", [1, 1], 5, True),
    ("s2_naip", "aerial"): ((1, 4, 96, 96), 24, 576, "aerial", [1, 3], 255, False),
    ("s2_naip", "spot"): ((1, 3, 96, 96), 8, 64, "spot", [3], 255, False),
    ("s2_naip", "s2"): ((16, 10, 12, 12), 6, 576, "s2", [4, 4, 2], 5000, False),
    ("s2_naip", "s1"): ((4, 2, 12, 12), 6, 144, "s1", [1, 1], 20, False),
}


@pytest.mark.parametrize(("dataset", "mod"), list(REFERENCE), ids=[f"{d}-{m}" for d, m in REFERENCE])
def test_preset_modality_matches_reference(dataset, mod):
    (n, c, h, _), grid, tokens, group, norm, fac, log = REFERENCE[(dataset, mod)]
    ds = preset(dataset)
    spec = validate_modality(mod, ds.modalities[mod], mod)
    assert (spec.num_dates, spec.channels, pixels(spec, ds.crop_m)) == (n, c, h)
    assert (spec.grid, spec.tokens, spec.group, spec.norm_groups) == (grid, tokens, group, norm)
    assert (spec.norm_fac, spec.log_scale) == (fac, log)


def test_reference_specifics():
    flair = preset("flair_hub")
    assert flair.modalities["aerial"].source_channels == [3, 0, 1, 2]  # RGBI -> NIR, R, G, B
    assert flair.modalities["dem"].rescale_elev
    assert preset("pastis_hd").modalities["s1_asc"].source_channels == [0, 1]  # VV, VH of (VV, VH, VV/VH)
    assert preset("treesatai_ts").modalities["aerial"].shift_px == 2  # 304 -> centre 300
    assert preset("flair2").inputs == ["aerial", "dem", "s2"]
    grids = {name: preset(name).grid_pos_enc for name in PRESETS}
    assert grids == {"treesatai_ts": 96, "pastis_hd": 256, "flair_hub": 160, "flair2": 160, "s2_naip": 192}


def test_inputs_and_groups_match_reference_params(fixtures_dir):
    ref = json.loads((fixtures_dir.parent / "reference" / "reference_params.json").read_text())["counts"]
    for ours, theirs in (
        ("treesatai_ts", "treesatai_ts"),
        ("pastis_hd", "pastis_hd"),
        ("flair_hub", "flair"),
    ):
        cfg = config.from_dict({"data": {"dataset": ours}})
        tiny = ref[theirs]["tiny"]
        assert list(cfg.derived.modalities) == tiny["filter_inputs"]
        assert [[m, s.group] for m, s in cfg.derived.modalities.items()] == tiny["groups"]


def test_validation_names_the_field():
    base = dict(bands=["a", "b", "c"], resolution_m=10.0, image_size=12, patch_size=4)
    with pytest.raises(ConfigError, match="x.band_groups"):
        validate_modality("x", ModalitySpec(**base, band_groups=[1, 1]), "x")
    with pytest.raises(ConfigError, match="x.source_channels"):
        validate_modality("x", ModalitySpec(**base, source_channels=[0, 1]), "x")
    with pytest.raises(ConfigError, match="x.patch_size"):
        validate_modality("x", ModalitySpec(**{**base, "patch_size": 5}), "x")
    with pytest.raises(ConfigError, match="x.resolution_m"):
        validate_modality("x", ModalitySpec(**{**base, "resolution_m": 0.0}), "x")
    ok = validate_modality("x", ModalitySpec(**base, band_groups=[2, 1]), "x")
    assert ok.groups == [2, 1] and ok.norm_groups == [2, 1] and ok.tokens == 2 * 9
