"""Segmentation end to end on the converted PASTIS-R fixture arrays (PASTIS-HD layout, 32 px tiles):
a probe of the `pastis_seg` head (64 crops per tile, void pixels left out) and crop embeddings."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from maestro import cli, config
from maestro.eval.phase import phase_config, run_phase

pytestmark = pytest.mark.usefixtures("clean_group_env")


def overrides(shards, runs):
    return [
        "data.dataset=pastis_hd",
        "data.inputs=[s2,s1_asc,s1_des]",
        "data.modalities.s2={resolution_m: 40.0, num_dates: 4}",
        "data.modalities.s1_asc={resolution_m: 40.0, num_dates: 2}",
        "data.modalities.s1_des={resolution_m: 40.0, num_dates: 2}",
        "model.size=debug",
        "model.inter_depth=1",
        "model.init=random",
        "data.batch_size=16",
        "data.workers=0",
        "run.workers=1",
        f"data.shards={shards}/fold1",
        f"eval.val={shards}/fold2",
        f"eval.test={shards}/fold3",
        f"run.storage={runs}",
        "run.name=seg",
        "eval.probe_steps=2",
        "eval.val_every=2",
        "eval.probe_base_lr=0.01",
    ]


def test_segmentation_probe_and_crop_embeddings(pastis_shards, tmp_path, capsys):
    cfg = config.from_dict({}, overrides(pastis_shards, tmp_path))
    res = run_phase(phase_config(cfg, "probe"), "probe")
    assert res["target"] == "pastis_seg" and res["monitor"] == "miou"
    assert 0 <= res["test"]["miou"] <= 1 and 0 <= res["test"]["overall_accuracy"] <= 1
    assert json.loads((tmp_path / "seg" / "probe" / "results.json").read_text()) == res

    out = tmp_path / "emb"
    assert cli.main(["embed", "configs/pastis_hd.yaml", *overrides(pastis_shards, tmp_path), str(out),
                     "--split", "test", "--no-progress"]) == 0  # fmt: skip
    rows = pq.read_table(next(out.glob("*.parquet"))).to_pylist()
    assert sorted(r["crop"] for r in rows) == list(range(64))  # the reference's 8×8 evaluation crops
    x0 = min(r["bounds"][0] for r in rows)
    x1 = max(r["bounds"][2] for r in rows)
    y0 = min(r["bounds"][1] for r in rows)
    y1 = max(r["bounds"][3] for r in rows)
    area = sum((r["bounds"][2] - r["bounds"][0]) * (r["bounds"][3] - r["bounds"][1]) for r in rows)
    assert area == pytest.approx((x1 - x0) * (y1 - y0))  # the crops tile the sample's footprint
    first = next(r for r in rows if r["crop"] == 0)
    assert first["bounds"][0] == x0 and first["bounds"][3] == y1  # crop 0 at the top left
    assert len(first["s2"]) == 32 and len(first["s1"]) == 32
