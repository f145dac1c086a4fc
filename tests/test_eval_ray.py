"""`maestro evaluate` through Ray Train on the converted real TreeSatAI-TS fixtures: pretrain, probe
and fine-tune as three Ray Train runs of one run folder on one local Ray, the in-loop probe logged
during pretraining."""

from __future__ import annotations

import json
import os
import re

import pytest

from maestro import cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_group_env")]


def test_evaluate_chains_pretrain_probe_finetune_on_ray(treesatai_shards, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [
        "evaluate",
        "configs/treesatai_ts_probe_finetune.yaml",
        "model.size=debug",
        "model.inter_depth=1",
        "data.batch_size=2",
        "data.workers=0",
        "run.workers=1",
        "run.use_gpu=false",
        f"data.shards={treesatai_shards}/train",
        f"run.storage={tmp_path}",
        "run.name=chain",
        "train.steps=2",
        "train.log_every=2",
        "eval.every=2",
        "eval.probe_samples=2",
        "eval.probe_steps=2",
        "eval.finetune_steps=2",
        "eval.val_every=2",
        "--json",
    ]
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    out = json.loads(next(ln for ln in lines if ln.startswith('{"pretrain"')))
    assert set(out) == {"pretrain", "probe", "finetune"} and out["pretrain"]["step"] == 2
    run = tmp_path / "chain"
    for phase in ("probe", "finetune"):
        res = json.loads((run / phase / "results.json").read_text())
        assert res == out[phase] and set(res["test"]) >= {
            "weighted_f1",
            "macro_f1",
            "ap",
            "overall_accuracy",
            "miou",
        }
    assert out["finetune"]["init"] == str(run / "probe" / "best.safetensors")
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in acc.Scalars("eval/probe_weighted_f1")] == [2]
    # One Ray for the three launches: the first starts it, the others use it, the chain stops it.
    import ray

    said = {p: (run / p / "logs" / "driver.log").read_text() for p in ("", "probe", "finetune")}
    started = re.findall(r"^ray: started a local Ray on 127\.0\.0\.1 in (\S+)$", said[""], re.M)
    assert len(started) == 1, said[""]
    for p in ("probe", "finetune"):
        assert f"ray: a local Ray on 127.0.0.1 in {started[0]}, started by an earlier launch" in said[p]
        assert "ray: started" not in said[p]
    assert not ray.is_initialized() and not os.path.exists(started[0])
    # A second `evaluate` resumes: pretraining is complete, and so are both phases.
    assert cli.main(args[:-1]) == 0
    text = capsys.readouterr().out
    assert "pretrain: already done" in text  # no worker group started for it
    assert "probe: already done" in text and "finetune: already done" in text
    assert json.loads((run / "summary.json").read_text())["step"] == 2
    # So does each phase's own command (`maestro probe`, `maestro finetune`: the same path).
    for phase in ("probe", "finetune"):
        assert cli.main([phase, *args[1:]]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert f"{phase}: already done" in lines[0]
        assert json.loads(next(ln for ln in lines if ln.startswith("{")))[phase] == out[phase]
