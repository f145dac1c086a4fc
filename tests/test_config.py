"""Config loading, overrides, type and value errors, saving, and every shipped config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from maestro import config
from maestro.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
OVERLAYS = [p for p in CONFIGS if p.name == "local.yaml"]  # applied over a preset, not alone
PRESETS = [p for p in CONFIGS if p not in OVERLAYS]


def test_defaults_resolve():
    cfg = config.load(None)
    assert cfg.data.dataset == "treesatai_ts"
    assert list(cfg.derived.modalities) == ["aerial", "s2", "s1_asc", "s1_des"]
    assert cfg.derived.groups == {"aerial": ["aerial"], "s2": ["s2"], "s1": ["s1_asc", "s1_des"]}


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_shipped_config_loads_and_resolves(path):
    cfg = config.load(path)
    assert cfg.derived.modalities and cfg.derived.global_batch >= 1 and cfg.derived.lr > 0
    raw = yaml.safe_load(path.read_text())
    # Shipped configs hold only deltas: every value they set differs from the default (naming the
    # dataset is allowed: it says what the file is for).
    defaults = config.Config()
    for section, values in raw.items():
        for key, value in values.items():
            if (section, key) == ("data", "dataset"):
                continue
            assert getattr(getattr(defaults, section), key) != value, (
                f"{path.name}: {section}.{key} equals the default"
            )


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_every_overlay_applies_over_every_preset_and_each_key_changes_one(overlay):
    raw = yaml.safe_load(overlay.read_text())
    presets = {p: yaml.safe_load(p.read_text()) for p in PRESETS}
    for section, values in raw.items():
        for key, value in values.items():
            assert any(p.get(section, {}).get(key, value) != value for p in presets.values()), (
                f"{overlay.name}: {section}.{key} changes no shipped preset"
            )
    for path in PRESETS:  # the overlay's values win over the preset's (`auto` resolved to a count)
        cfg = config.load(path, [str(overlay)])
        assert cfg.run.storage == raw["run"]["storage"] and cfg.derived.global_batch >= 1
        assert isinstance(cfg.run.workers, int) and cfg.run.workers >= 1


def test_overrides_apply_with_yaml_types():
    cfg = config.load(
        None, ["mask.ratio=0.5", "model.size=small", "data.inputs=[s2, s1_asc]", "train.steps=7"]
    )
    assert cfg.mask.ratio == 0.5 and cfg.model.size == "small" and cfg.train.steps == 7
    assert list(cfg.derived.modalities) == ["s2", "s1_asc"]


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert config.load(None, ["optim.base_lr=1"]).optim.base_lr == 1.0
    with pytest.raises(ConfigError, match="train.steps"):
        config.load(None, ["train.steps=1.5"])


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("model.no_such_key=1", "model.no_such_key", "known key"),
        ("nosection.x=1", "nosection.x", "section"),
        ("mask.ratio=1.5", "mask.ratio", "[0, 1)"),
        ("mask.ratio=-0.1", "mask.ratio", "[0, 1)"),
        ("model.size=huge", "model.size", "'tiny'"),
        ("model.fusion=shared", "model.inter_depth", "joint blocks"),
        ("train.zero_stage=4", "train.zero_stage", "0, 1, 2 or 3"),
        ("data.batch_size=abc", "data.batch_size", "integer"),
        ("data.dataset=nope", "data.dataset", "treesatai_ts"),
        ("data.inputs=[s2, radar]", "data.inputs", "modalities among"),
        ("data.modalities.s2.patch_size=4", "data.modalities.s2.patch_size", "divisor of image_size=6"),
        ("data.modalities.s2.norm_bands=[4, 4]", "data.modalities.s2.norm_bands", "summing to the 10 bands"),
        ("data.modalities.s2.colour=1", "data.modalities.s2.colour", "modality field"),
        ("model.inter_depth=13", "model.inter_depth", "at most the depth"),
        ("run.name=a/b", "run.name", "without '/'"),
    ],
)
def test_errors_name_the_key_value_and_what_is_allowed(override, key, fragment):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert e.value.key == key
    assert fragment in str(e.value)
    assert f"'{key}'" in str(e.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(None, ["mask.ratio"])
    with pytest.raises(ConfigError, match="existing YAML file"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match="model"):
        config.load(bad)


def test_derived_values_cannot_be_set():
    with pytest.raises(ConfigError, match="derived"):
        config.from_dict({"derived": {"lr": 1.0}})


def test_user_sensor_declared_in_yaml_no_code(tmp_path):
    path = tmp_path / "sensor.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "dataset": "treesatai_ts",
                    "inputs": ["s2", "planet"],
                    "modalities": {
                        "planet": {
                            "bands": ["b", "g", "r", "nir"],
                            "resolution_m": 3.0,
                            "image_size": 20,
                            "patch_size": 4,
                            "num_dates": 6,
                            "norm_bands": [3, 1],
                            "norm_fac": 10000,
                            "group": "s2",  # regrouped with S2: one encoder for both
                        }
                    },
                }
            }
        )
    )
    cfg = config.load(path)
    planet = cfg.derived.modalities["planet"]
    assert planet.tokens == 6 * 25 and planet.norm_groups == [3, 1] and planet.embed == "planet"
    assert cfg.derived.groups == {"s2": ["s2", "planet"]}
    with pytest.raises(ConfigError, match="data.modalities.planet.patch_size"):
        config.load(path, ["data.modalities.planet.patch_size=3"])
    with pytest.raises(ConfigError, match="required keys"):
        config.load(None, ["data.modalities.radar={bands: [vv]}", "data.inputs=[radar]"])


def test_sqrt_batch_lr_scaling_matches_the_reference_table():
    # maestro_reference.md §5.2: 32 per device × 8 GPUs -> lr 2.77e-4 at base 3e-5.
    cfg = config.load(None, ["data.batch_size=32", "run.workers=8"])
    assert cfg.derived.global_batch == 256
    assert cfg.derived.lr == pytest.approx(2.77e-4, rel=2e-3)
    assert cfg.derived.deepspeed["train_batch_size"] == 256


def test_save_writes_the_resolved_config(tmp_path):
    cfg = config.load(None, ["mask.ratio=0.6"])
    config.save(cfg, tmp_path / "resolved.yaml")
    saved = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert saved["mask"]["ratio"] == 0.6
    assert saved["derived"]["modalities"]["s2"]["norm_bands"] == [4, 4, 2]
    assert saved["derived"]["lr"] == pytest.approx(cfg.derived.lr)


def test_cli_error_is_one_clear_line():
    for override, key in (("model.no_such_key=1", "model.no_such_key"), ("mask.ratio=1.5", "mask.ratio")):
        r = subprocess.run(
            [sys.executable, "-m", "maestro.cli", "info", "configs/demo.yaml", override],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert r.returncode != 0
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and key in lines[0], r.stderr
