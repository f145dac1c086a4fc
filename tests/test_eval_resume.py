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


def finetune_config(shards, runs, name, *extra, phase="finetune"):
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
                "eval.probe_steps=3",
                "eval.probe_base_lr=0.01",
                *extra,
            ],
        ),
        phase,
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


def last_checkpoint(folder):
    """The module weights and EMA of a phase's newest checkpoint."""
    from maestro.eval.weights import read_run
    from maestro.train.checkpoint import decode

    step = max(p for p in folder.glob("checkpoint_*") if (p / "COMPLETE").exists())
    return read_run(str(folder)), decode((step / "ema.pt").read_bytes())["shadow"], step.name


def curve(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_an_interrupted_finetune_resumes_to_the_results_and_weights_of_an_uninterrupted_one(
    treesatai_shards, tmp_path, capsys
):
    whole = run_phase(finetune_config(treesatai_shards, tmp_path, "whole"), "finetune")
    cfg = finetune_config(treesatai_shards, tmp_path, "cut")
    folder = tmp_path / "cut" / "finetune"
    # Killed twice: in step 4, mid-epoch (two training samples, batches of one), and in the last
    # step the whole run took, before its validation (when that run stopped early, the checkpoint
    # before holds a moved early-stopping counter and an older best).
    cuts = sorted({4, whole["steps"]})
    for k in cuts:
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
    assert f"resumed from {folder}/checkpoint_{cuts[-1] - 1:08d}" in capsys.readouterr().out
    assert comparable(resumed) == comparable(whole)
    assert json.loads((folder / "results.json").read_text()) == resumed
    a, b = (
        load_file(tmp_path / "whole" / "finetune" / "best.safetensors"),
        load_file(folder / "best.safetensors"),
    )
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    # The last state too: trained weights, EMA, and the validation curve (EMA weights) step by step.
    (wa, ea, sa), (wb, eb, sb) = last_checkpoint(tmp_path / "whole" / "finetune"), last_checkpoint(folder)
    assert sa == sb and wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)
    for x, y in zip(eb, ea, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for tag in ("eval/finetune/val_ap", "eval/finetune/train_loss"):
        want, got = curve(tmp_path / "whole" / "finetune", tag), curve(folder, tag)
        assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-5)

    # A finished phase is not run again: it says so and keeps its results and weights.
    stamp = (folder / "best.safetensors").stat().st_mtime_ns
    assert run_phase(cfg, "finetune") == resumed
    assert "finetune: already done" in capsys.readouterr().out
    assert (folder / "best.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(CheckpointError, match="cannot resume"):
        run_phase(changed, "finetune")


def test_an_interrupted_probe_resumes_to_the_heads_of_an_uninterrupted_one(treesatai_shards, tmp_path):
    whole = run_phase(finetune_config(treesatai_shards, tmp_path, "whole", phase="probe"), "probe")
    cfg = finetune_config(treesatai_shards, tmp_path, "cut", phase="probe")
    with pytest.raises(Interrupted):
        run_phase(cfg, "probe", on_step=interrupt_at(3))
    resumed = run_phase(cfg, "probe")
    assert comparable(resumed) == comparable(whole) and resumed["steps"] == 3
    a = load_file(tmp_path / "whole" / "probe" / "best.safetensors")
    b = load_file(tmp_path / "cut" / "probe" / "best.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    # A finished probe: the fine-tune recipe may change (it is not run again), eval.val_every not.
    assert (
        run_phase(
            finetune_config(treesatai_shards, tmp_path, "cut", "eval.finetune_steps=9", phase="probe"),
            "probe",
        )
        == resumed
    )
    with pytest.raises(CheckpointError, match=r"eval\.val_every"):
        run_phase(
            finetune_config(treesatai_shards, tmp_path, "cut", "eval.val_every=2", phase="probe"), "probe"
        )
