"""A probe or fine-tune phase checkpoints and resumes as pretraining does: a fine-tune interrupted
mid-way and rerun ends with the results and weights of an uninterrupted one; a finished phase is
not run again; a changed config is refused. Debug model on the converted TreeSatAI-TS fixtures,
from a random encoder (no pretraining run needed)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from maestro import config
from maestro.errors import CheckpointError
from maestro.eval.phase import phase_config, run_phase

pytestmark = pytest.mark.usefixtures("clean_group_env")

STEPS = 6


def finetune_config(shards, runs, name, *extra):
    return phase_config(
        config.from_dict(
            {},
            [
                "model.size=debug",
                "model.inter_depth=1",
                "model.init=random",
                "data.batch_size=1",
                "data.workers=0",
                "run.workers=1",
                f"data.shards={shards}/train",
                f"run.storage={runs}",
                f"run.name={name}",
                f"eval.finetune_steps={STEPS}",
                "eval.val_every=1",
                "eval.patience=2",
                "eval.finetune_base_lr=0.001",
                *extra,
            ],
        ),
        "finetune",
    )


class Interrupted(Exception):
    pass


def interrupt_at(k):
    def on_step(step, engine):
        if step == k:
            raise Interrupted(f"killed at step {k}")

    return on_step


def comparable(results):
    return {k: v for k, v in results.items() if k != "run"}


def test_an_interrupted_finetune_resumes_to_the_results_and_weights_of_an_uninterrupted_one(
    treesatai_shards, tmp_path, capsys
):
    whole = run_phase(finetune_config(treesatai_shards, tmp_path, "whole"), "finetune")
    cfg = finetune_config(treesatai_shards, tmp_path, "cut")
    folder = tmp_path / "cut" / "finetune"
    # Killed in the last step the whole run took, before its validation: when that run stopped
    # early, the checkpoint before holds a moved early-stopping counter and an older best.
    k = whole["steps"]
    with pytest.raises(Interrupted):
        run_phase(cfg, "finetune", on_step=interrupt_at(k))
    assert not (folder / "results.json").exists()
    saved = sorted(p.name for p in folder.glob("checkpoint_*") if (p / "COMPLETE").exists())
    assert saved[-1] == f"checkpoint_{k - 1:08d}"
    assert (folder / saved[-1] / "phase.pt").exists() and (folder / saved[-1] / "ema.pt").exists()

    # A changed setting the phase runs with is refused, as pretraining refuses one, and writes nothing.
    before = (folder / "config.yaml").read_text()
    changed = finetune_config(treesatai_shards, tmp_path, "cut", "eval.patience=5")
    with pytest.raises(CheckpointError, match=r"cannot resume .*eval\.patience"):
        run_phase(changed, "finetune")
    assert (folder / "config.yaml").read_text() == before

    capsys.readouterr()
    resumed = run_phase(cfg, "finetune")
    assert f"resumed from {folder}/checkpoint_{k - 1:08d}" in capsys.readouterr().out
    assert comparable(resumed) == comparable(whole)
    assert json.loads((folder / "results.json").read_text()) == resumed
    a, b = (
        load_file(tmp_path / "whole" / "finetune" / "best.safetensors"),
        load_file(folder / "best.safetensors"),
    )
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)

    # A finished phase is not run again: it says so and keeps its results and weights.
    stamp = (folder / "best.safetensors").stat().st_mtime_ns
    assert run_phase(cfg, "finetune") == resumed
    assert "finetune: already done" in capsys.readouterr().out
    assert (folder / "best.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(CheckpointError, match="cannot resume"):
        run_phase(changed, "finetune")
