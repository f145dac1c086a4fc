"""`maestro info` token counts against the reference (issue 2), for every fusion mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maestro import cli, config, info

REPO = Path(__file__).resolve().parents[1]

EXPECTED = {
    "treesatai_ts": (441, 110, {"aerial": (225, 56), "s2": (144, 36), "s1": (72, 18)}),
    "pastis_hd": (1636, 409, {"spot": (100, 25), "s2": (1024, 256), "s1": (512, 128)}),
    "flair_hub": (1880, 470, {"aerial": (1024, 256), "dem": (256, 64), "s2": (400, 100), "s1": (200, 50)}),
}


@pytest.mark.parametrize("dataset", list(EXPECTED))
def test_cli_info_json_matches_reference(dataset, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["info", f"configs/{dataset}.yaml", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    total, visible, groups = EXPECTED[dataset]
    assert (rep["tokens"]["total"], rep["tokens"]["visible"]) == (total, visible)
    assert {g: (v["total"], v["visible"]) for g, v in rep["tokens"]["groups"].items()} == groups
    assert sum(m["total"] for m in rep["tokens"]["modalities"].values()) == total


def test_reference_fixture_token_counts(fixtures_dir):
    meta = json.loads((fixtures_dir / "reference_model" / "treesatai_ts_tiny" / "meta.json").read_text())
    t = info.tokens(config.load(None))
    for g, v in meta["token_counts"]["per_group"].items():
        assert t["groups"][g] == {"total": v["tokens"], "visible": v["visible"]}
    for m, v in meta["token_counts"]["per_modality"].items():
        assert t["modalities"][m]["total"] == v["tokens"]


def test_fusion_modes_and_mask_scale():
    mod = info.tokens(config.load(None, ["model.fusion=mod"]))
    assert set(mod["groups"]) == {"aerial", "s2", "s1_asc", "s1_des"}
    assert mod["groups"]["s1_asc"] == {"total": 36, "visible": 9}  # round(0.75 * 36) = 27 masked
    shared = info.tokens(config.load(None, ["model.fusion=shared", "model.inter_depth=0"]))
    # Per image: S2 has 9 tokens per date, round(0.75 * 9) = 7 masked, 2 visible, over 16 dates.
    assert shared["modalities"]["s2"]["visible"] == 16 * 2
    # mask.scale raises the ratio of long sequences: 1 - 0.25 / 16**0.5 for S2 (16 dates).
    scaled = info.tokens(config.load(None, ["mask.scale=0.5"]))
    assert scaled["groups"]["s2"]["visible"] == 144 - round((1 - 0.25 / 4) * 144)
    assert scaled["groups"]["aerial"]["visible"] == 56  # one date: unchanged


@pytest.mark.parametrize("fusion", ["monotemp", "group"])
def test_info_visible_counts_are_what_the_model_keeps_at_a_high_ratio(fusion, small_config, make_batch):
    """At mask.ratio=0.95 a 9-token image would round to 9 masked; the model keeps one visible."""
    from maestro.model import build_model

    cfg = small_config(f"model.fusion={fusion}", "model.inter_depth=0", "mask.ratio=0.95")
    tokens = info.tokens(cfg)
    with torch.no_grad():
        out = build_model(cfg)(make_batch(cfg), generator=torch.Generator().manual_seed(0))
    kept = {k: (~v).sum(1).tolist() for k, v in out.masks.items()}
    assert kept == {k: [v["visible"]] * 2 for k, v in tokens["groups"].items()}
    if fusion == "monotemp":
        s2 = cfg.derived.modalities["s2"]
        assert tokens["groups"]["s2"]["visible"] == s2.num_dates * len(s2.groups)  # one per image
    flops = info.report(cfg)["flops_per_sample"]
    assert flops["total"] == flops["encoder"] + flops["decoder"]
