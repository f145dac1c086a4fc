"""The in-loop probe: a linear classifier on frozen embeddings, logged by the trainer as eval/probe_*."""

from __future__ import annotations

import pytest
import torch

from maestro import config
from maestro.eval.inloop import fit_and_score, probe_scores
from maestro.modalities import TargetSpec
from maestro.train.loop import train


def test_linear_probe_separates_separable_features_and_not_noise():
    g = torch.Generator().manual_seed(0)
    spec = TargetSpec("multilabel", 3, -1)
    y = (torch.rand(400, 3, generator=g) < 0.4).long()
    informative = y.float() + 0.1 * torch.randn(400, 3, generator=g)
    noise = torch.randn(400, 3, generator=g)
    good = fit_and_score(spec, informative[:300], y[:300], informative[300:], y[300:])
    bad = fit_and_score(spec, noise[:300], y[:300], noise[300:], y[300:])
    assert good["weighted_f1"] > 0.95 and good["ap"] > 0.95
    assert bad["weighted_f1"] < 0.7 and bad["ap"] < 0.7


def test_segmentation_probe_classifies_locations():
    g = torch.Generator().manual_seed(0)
    spec = TargetSpec("segmentation", 4, 9, reference="s2", resolution_m=10)
    y = torch.randint(0, 4, (500,), generator=g)
    y[:50] = 9  # missing labels take no part
    x = torch.nn.functional.one_hot(y.clamp(max=3), 4).float() + 0.1 * torch.randn(500, 4, generator=g)
    r = fit_and_score(spec, x[:400], y[:400], x[400:], y[400:])
    assert r["miou"] > 0.95 and r["overall_accuracy"] > 0.95


@pytest.mark.usefixtures("clean_group_env")
def test_pretraining_logs_the_in_loop_probe(treesatai_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config.from_dict(
        {},
        [
            "model.size=debug",
            "model.inter_depth=1",
            "data.batch_size=2",
            "data.workers=0",
            "run.workers=1",
            f"data.shards={treesatai_shards}/train",
            f"run.storage={tmp_path}",
            "run.name=inloop",
            "train.steps=4",
            "train.log_every=2",
            "eval.every=4",
            "eval.probe_samples=2",
        ],
    )
    train(cfg, probe=probe_scores)
    acc = EventAccumulator(str(tmp_path / "inloop" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    for name in ("weighted_f1", "macro_f1", "ap", "overall_accuracy", "miou"):
        events = acc.Scalars(f"eval/probe_{name}")
        assert [e.step for e in events] == [4]


def test_in_loop_probe_must_run_at_log_steps():
    with pytest.raises(config.ConfigError, match="eval.every"):
        config.from_dict({}, ["train.log_every=10", "eval.every=15"])
