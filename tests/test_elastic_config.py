"""Elastic worker counts in the config: `run.workers=[MIN, MAX]`, the global batch every count of
the range holds, and the accumulation that keeps it at each count."""

from __future__ import annotations

import pytest

from maestro import config
from maestro.errors import ConfigError


def _load(*overrides: str):
    return config.load("configs/demo.yaml", ["data.batch_size=2", *overrides])


def test_a_range_keeps_the_global_batch_by_the_accumulation_at_every_count():
    cfg = _load("run.workers=[1,3]", "train.global_batch=12")
    assert config.worker_range(cfg) == (1, 3)
    assert [config.accumulation(cfg, w) for w in (1, 2, 3)] == [6, 3, 2]
    for w in (1, 2, 3):
        ds = config.deepspeed_config(cfg, w, use_gpu=False)
        assert (
            ds["train_batch_size"]
            == 12
            == ds["train_micro_batch_size_per_gpu"] * w * ds["gradient_accumulation_steps"]
        )
        assert (
            ds["zero_optimization"]["stage"] == cfg.train.zero_stage
        )  # partitioned from the start: it may grow


def test_the_global_batch_defaults_to_the_most_workers_with_the_given_accumulation():
    cfg = _load("run.workers=[2,4]", "train.grad_accum=6")
    assert cfg.derived.global_batch == 2 * 6 * 4
    assert [config.accumulation(cfg, w) for w in (2, 3, 4)] == [12, 8, 6]
    assert _load("run.workers=[3,3]").run.workers == 3  # an empty range is a number


def test_counts_that_cannot_hold_the_global_batch_are_refused_naming_those_that_can():
    with pytest.raises(ConfigError) as info:
        _load("run.workers=[1,3]")  # 2 × 1 × 3 = 6: two workers would need 1.5 micro-batches
    text = str(info.value)
    assert "'run.workers'" in text and "global batch 6" in text
    assert "only [1, 3] can" in text and "train.global_batch=N with N a multiple of 12" in text
    with pytest.raises(ConfigError, match=r"'train.global_batch': got 10.*only \[1\] can"):
        _load("run.workers=[1,2]", "train.global_batch=10")


@pytest.mark.parametrize("value", ["[3,1]", "[0,2]", "[1,2,3]"])
def test_a_bad_range_is_refused(value):
    with pytest.raises(ConfigError, match=r"\[MIN, MAX\] with 1 <= MIN <= MAX"):
        _load(f"run.workers={value}")


def test_a_cluster_that_holds_the_fewest_workers_of_a_range_is_enough_to_start():
    from cluster import resources

    cfg = _load("run.workers=[2,4]", "train.global_batch=24", "run.use_gpu=false")
    assert resources.shortfall(cfg, [{"CPU": 1.0}, {"CPU": 1.0}], "the Ray cluster") is None
    text = resources.shortfall(cfg, [{"CPU": 1.0}], "the Ray cluster")
    assert "run.workers=[2, 4] asks for at least 2 worker(s) of 1 CPU(s) each" in text
