"""Probe, fine-tune, embed and export end to end on the converted real TreeSatAI-TS fixtures
(one plain process; `maestro evaluate` through Ray Train in tests/test_eval_ray.py)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from maestro import cli, config
from maestro.eval.phase import phase_config, run_phase
from maestro.train.loop import train

pytestmark = pytest.mark.usefixtures("clean_group_env")


def small(shards, runs, *extra):
    """A debug-size model on the real TreeSatAI-TS geometry (aerial 300 px, 16 S2 dates)."""
    return [
        "model.size=debug",
        "model.inter_depth=1",
        "data.batch_size=2",
        "data.workers=0",
        "run.workers=1",
        f"data.shards={shards}/train",
        f"run.storage={runs}",
        "train.steps=2",
        "train.log_every=1",
        "eval.probe_steps=2",
        "eval.finetune_steps=4",
        "eval.val_every=1",
        "eval.patience=1",
        "eval.probe_base_lr=0.01",
        *extra,
    ]


def scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def run(treesatai_shards, tmp_path_factory):
    """A run pretrained 2 steps, probed, fine-tuned."""
    runs = tmp_path_factory.mktemp("runs")
    cfg = config.from_dict({}, [*small(treesatai_shards, runs), "run.name=r"])
    train(cfg)
    probe = run_phase(phase_config(cfg, "probe"), "probe")
    finetune = run_phase(phase_config(cfg, "finetune"), "finetune")
    return cfg, runs / "r", probe, finetune


def test_probe_trains_the_heads_of_the_pretrained_encoder_and_scores_val_and_test(run):
    _cfg, folder, probe, _ = run
    results = json.loads((folder / "probe" / "results.json").read_text())
    assert results == probe
    assert results["init"] == str(folder) and results["target"] == "treesat_mlc_thresh"
    assert results["what_runs"]["stage"] == 0  # one worker: nothing to partition
    for split in ("val", "test"):
        assert set(results[split]) >= {"weighted_f1", "macro_f1", "ap", "overall_accuracy", "miou"}
        assert 0 <= results[split]["overall_accuracy"] <= 1
    assert scalars(folder / "probe" / "tensorboard", "eval/probe/val_weighted_f1").keys() == {1, 2}
    # The encoder stayed frozen: its weights equal the pretraining checkpoint's.
    from safetensors.torch import load_file

    from maestro.eval.weights import read_run

    best = load_file(folder / "probe" / "best.safetensors")
    pretrained = {k.removeprefix("model."): v for k, v in read_run(str(folder)).items()}
    name = "encoder.aerial.layers.0.0.to_qkv.weight"
    assert torch.equal(best[name], pretrained[name].float())
    head = "heads.treesat_mlc_thresh.reduce.query"
    assert not torch.equal(best[head], pretrained[head].float())


def test_finetune_starts_from_the_probe_moves_the_encoder_and_stops_early(run):
    _, folder, _probe, finetune = run
    assert finetune["init"] == str(folder / "probe" / "best.safetensors")
    assert finetune["steps"] <= 4 and finetune["best_step"] >= 1
    assert finetune["stopped_early"] == (finetune["steps"] < 4)
    from safetensors.torch import load_file

    a, b = (
        load_file(folder / "probe" / "best.safetensors"),
        load_file(folder / "finetune" / "best.safetensors"),
    )
    name = "encoder.aerial.layers.0.0.to_qkv.weight"
    assert not torch.equal(a[name], b[name])  # the encoder learned
    assert torch.equal(a["decoder.aerial.norm.weight"], b["decoder.aerial.norm.weight"])  # not optimized
    tags = scalars(folder / "finetune" / "tensorboard", "eval/finetune/test_weighted_f1")
    assert list(tags) == [finetune["best_step"]]


def test_random_init_is_the_baseline(treesatai_shards, tmp_path):
    cfg = config.from_dict({}, [*small(treesatai_shards, tmp_path), "run.name=b", "model.init=random"])
    res = run_phase(phase_config(cfg, "probe"), "probe")
    assert res["init"] == "random" and set(res["test"]) >= {"weighted_f1", "ap"}


def _polygon(wkb: bytes) -> list[tuple[float, float]]:
    order, kind, rings, n = struct.unpack_from("<BIII", wkb)
    assert (order, kind, rings) == (1, 3, 1)
    return [struct.unpack_from("<dd", wkb, 13 + 16 * i) for i in range(n)]


def test_embed_writes_geoparquet_with_footprints_and_resumes(run, treesatai_shards, tmp_path, capsys):
    _cfg, folder, _, _ = run
    out = tmp_path / "emb"
    args = ["embed", "configs/treesatai_ts.yaml", *small(treesatai_shards, folder.parent), "run.name=r"]
    assert cli.main([*args, str(out), "--tokens", "--no-progress"]) == 0
    files = sorted(out.glob("*.parquet"))
    table = pq.read_table(files[0])
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["crs"] == {"id": "EPSG:25832"}
    rows = table.to_pylist()
    from shards import reader

    samples = {s.meta["id"]: s.meta for s in reader.iter_split(str(treesatai_shards / "test"))}
    assert sorted(r["id"] for r in rows) == sorted(samples) and len(files) == 1
    for r in rows:
        x0, y0, x1, y1 = r["bounds"]
        assert r["bounds"] == samples[r["id"]]["bounds"] and x1 > x0 and y1 > y0  # one crop: the tile
        assert _polygon(r["geometry"]) == [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
        assert len(r["aerial"]) == 32 and len(r["s1"]) == 32  # modality and fusion-group means
        assert len(r["tokens/s2"]) == 16 * 9 * 32
    # The embeddings are the model's: the pooled aerial tokens of the first row.
    np.testing.assert_allclose(
        np.array(rows[0]["aerial"]),
        np.array(rows[0]["tokens/aerial"]).reshape(-1, 32).mean(0),
        rtol=1e-5,
        atol=1e-6,
    )
    # A rerun resumes: complete files are kept, a truncated one is written again.
    capsys.readouterr()
    assert cli.main([*args, str(out), "--no-progress"]) == 0
    assert "embedded 2 items" in capsys.readouterr().out and pq.read_table(files[0]).num_rows == 2
    files[0].write_bytes(files[0].read_bytes()[:100])  # cut short, as by a crash
    assert cli.main([*args, str(out), "--no-progress"]) == 0
    pooled_only = [{k: v for k, v in r.items() if not k.startswith("tokens/")} for r in rows]
    assert pq.read_table(files[0]).to_pylist() == pooled_only  # written again (without --tokens)


def test_export_writes_the_encoder_alone_and_build_encoder_loads_it(run, treesatai_shards, tmp_path):
    from safetensors.torch import load_file

    from maestro.eval.data import Pass
    from maestro.eval.export import build_encoder
    from maestro.eval.weights import load_init
    from maestro.model import build_model

    cfg, folder, _, _ = run
    out = tmp_path / "encoder.safetensors"
    args = ["export", "configs/treesatai_ts.yaml", *small(treesatai_shards, folder.parent), "run.name=r"]
    assert cli.main([*args, str(out)]) == 0
    names = set(load_file(out))
    assert any(n.startswith("encoder.") for n in names)
    assert not any(n.startswith(("decoder.", "heads.", "mask_token.", "embed_to_rec.")) for n in names)
    encoder = build_encoder(str(out))
    model = build_model(cfg).eval()
    load_init(model, str(folder))
    batch = next(iter(Pass(cfg, str(treesatai_shards / "test")).batches()))
    batch = {k: v for k, v in batch.items() if not k.startswith("_")}
    with torch.no_grad():
        got, want = encoder(batch), model.encode(batch)
        pooled = encoder.pooled(batch)
    for m in want:
        torch.testing.assert_close(got[m], want[m])
    assert pooled.shape == (2, 32)


def test_a_phase_without_weights_to_start_from_is_refused_before_it_starts(treesatai_shards, tmp_path):
    from maestro.errors import CheckpointError

    cfg = config.from_dict({}, [*small(treesatai_shards, tmp_path), "run.name=never_pretrained"])
    with pytest.raises(CheckpointError, match="holds no complete checkpoint.*model.init"):
        phase_config(cfg, "probe")
    missing = config.from_dict(
        {}, [*small(treesatai_shards, tmp_path), f"model.init={tmp_path}/x.safetensors"]
    )
    with pytest.raises(CheckpointError, match="no such file"):
        phase_config(missing, "probe")


def test_phases_run_at_most_zero_2_and_say_so(treesatai_shards, tmp_path):
    from cluster.eval_cli import banner
    from maestro.train import resume
    from maestro.train.loop import run_url

    cfg = config.from_dict(
        {},
        [
            *small(treesatai_shards, tmp_path),
            "run.name=z",
            "model.init=random",
            "train.zero_stage=3",
            "run.workers=2",
        ],
    )
    pcfg = phase_config(cfg, "finetune")
    assert pcfg.train.zero_stage == 2 and pcfg.derived.deepspeed["zero_optimization"]["stage"] == 2
    assert resume.what_runs(pcfg, run_url(pcfg))["stage"] == 2
    line = banner(cfg, pcfg, "finetune")
    assert "ZeRO stage 2 (train.zero_stage=3: phases run at most ZeRO-2" in line and "2 worker(s)" in line


def test_eval_splits_beside_a_mix_of_shards_are_asked_for_by_name():
    """`data.shards` as weighted splits has no one folder the eval splits stand beside: each
    unset `eval.SPLIT` is a ConfigError naming it; a set one is used as given."""
    from maestro.errors import ConfigError
    from maestro.eval.data import split_url

    mix = "data.shards=[{path: /a/train, weight: 1}, {path: /b/train, weight: 2}]"
    cfg = config.from_dict({}, [mix])
    for split in ("train", "val", "test"):
        with pytest.raises(ConfigError, match=rf"eval\.{split}.*mix of splits"):
            split_url(cfg, split)
    assert split_url(config.from_dict({}, [mix, "eval.val=/c/val"]), "val") == "/c/val"
    assert split_url(config.from_dict({}, ["data.shards=/a/train"]), "test") == "/a/test"
