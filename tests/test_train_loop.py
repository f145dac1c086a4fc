"""The training loop in one plain process (no Ray): exact resume after a stop, divergence, preflight."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from conftest import SMALL_TRAIN

from maestro import cli, config
from maestro.errors import Diverged
from maestro.train import checkpoint, resume
from maestro.train.loop import train

# The shared small run (conftest's SMALL_TRAIN) with a data-loader process and images at step 3,
# periodic checkpoints as the demo's unless a test sets them.
SMALL = [*SMALL_TRAIN, "data.workers=1", "train.image_every=3", "train.checkpoint_every=50"]


pytestmark = pytest.mark.usefixtures("clean_group_env")


@pytest.fixture
def archive(train_archive):
    return train_archive


def _cfg(archive, tmp_path, name, *extra):
    return config.load(
        "configs/demo.yaml",
        [*SMALL, f"data.shards={archive}", f"run.storage={tmp_path}", f"run.name={name}", *extra],
    )


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_stopped_run_resumes_exactly_where_it_stopped(archive, tmp_path):
    whole = train(_cfg(archive, tmp_path, "whole", "train.checkpoint_every=3"))
    assert whole["step"] == 4 and whole["start_step"] == 0

    def interrupt(step, engine, batches):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: a final checkpoint, then a clean return

    cut = _cfg(archive, tmp_path, "cut", "train.checkpoint_every=3")
    first = train(cut, on_step=interrupt)
    assert first["stopped"] and first["step"] == 2
    store = checkpoint.CheckpointStore(str(tmp_path / "cut"), keep=3)
    assert store.complete_steps() == [2]
    second = train(cut)
    assert second["start_step"] == 2 and second["step"] == 4 and not second["stopped"]
    # Same batches, same masks, same optimizer and schedule state: the curves are the same.
    for tag in ("train/loss", "train/lr", "train/loss/s2"):
        a, b = _scalars(tmp_path / "whole", tag), _scalars(tmp_path / "cut", tag)
        assert sorted(b) == [1, 2, 3, 4]
        assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-5)
    assert store.complete_steps() == [2, 3, 4]
    assert json.loads(store.read(4, "state.json")) == {
        "step": 4,
        "world_size": 1,
        "zero_stage": 0,
        "steps": 4,
    }
    assert "package" in json.loads(store.read(4, "version.json"))
    assert store.read(4, "config.yaml").decode() == config.dump(cut)
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["skipped"] == {"total": 0, "reasons": {}}
    what = {"stage": 0, "precision": "fp32", "optimizer": "AdamW (foreach)", "global_batch": 2, "workers": 1}
    assert {k: summary[k] for k in what} == what == resume.what_runs(cut, str(tmp_path / "cut"))


def test_nonfinite_loss_names_step_and_modalities_and_keeps_last_checkpoint(archive, tmp_path):
    def poison(step, engine, batches):
        if step == 3:  # weights destroyed after step 3: step 4's loss is NaN
            with torch.no_grad():
                for p in engine.module.parameters():
                    p.fill_(float("nan"))

    cfg = _cfg(
        archive, tmp_path, "nan", "train.checkpoint_every=2", "train.log_every=2", "train.zero_stage=0"
    )
    with pytest.raises(Diverged, match=r"non-finite loss at step 4 in loss, aerial, s2") as e:
        train(cfg, on_step=poison)
    assert "checkpoint_00000002" in str(e.value)
    store = checkpoint.CheckpointStore(str(tmp_path / "nan"), keep=3)
    assert store.complete_steps() == [2]
    assert _scalars(tmp_path / "nan", "train/grad_norm")[2] > 0  # measured by the loop at stage 0
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["diverged"].startswith("non-finite loss at step 4")


def test_packed_batches_train_and_count_the_samples_and_tokens_they_hold(tmp_path):
    """`data.token_budget>0` end to end: every acquisition kept, samples of their own lengths
    packed under the budget; throughput counts the samples and tokens actually trained."""
    from maestro.data import build_loader
    from shards.synth import write_synthetic

    # Uncapped series (40-150 S2 and 60-120 S1 dates per sample) at one token per date.
    write_synthetic(str(tmp_path / "a"), "treesatai_ts", 12, seed=3, sizes={"aerial": 34}, shard_samples=4)
    cfg = _cfg(
        str(tmp_path / "a" / "train"),
        tmp_path,
        "packed",
        "data.inputs=[aerial,s2,s1_asc]",
        "data.modalities.aerial={resolution_m: 2.0, image_size: 30, patch_size: 10}",
        "data.modalities.s2={dates: all, patch_size: 6}",
        "data.modalities.s1_asc={dates: all, patch_size: 6}",
        "data.token_budget=600",
        "data.workers=0",
        "train.steps=3",
        "train.log_every=3",
        "train.grad_accum=2",
    )
    expected = []
    for batch, _ in zip(build_loader(cfg, 0, 1, train=True), range(6)):
        assert "cu_seqlens" in batch and batch["_padding_fraction"] < 1
        expected.append((len(batch["_keys"]), int(batch["cu_seqlens"][-1])))
    assert len({n for n, _ in expected}) > 1 or len({t for _, t in expected}) > 1  # batches vary
    summary = train(cfg)
    samples, tokens = sum(n for n, _ in expected), sum(t for _, t in expected)
    assert summary["step"] == 3 and summary["samples"] == samples
    sps, tps = (_scalars(tmp_path / "packed", f"perf/{k}_per_s")[3] for k in ("samples", "tokens"))
    assert tps / sps == pytest.approx(tokens / samples, rel=1e-5)
    assert all(torch.isfinite(torch.tensor(v)) for v in _scalars(tmp_path / "packed", "train/loss").values())


def test_pretrain_fails_before_workers_start_on_missing_shards_or_bucket(tmp_path, s3_bucket, capsys):
    code = cli.main(["pretrain", "configs/demo.yaml", f"data.shards={tmp_path}/nowhere"])
    assert code == 2
    assert f"no manifest.json at {tmp_path}/nowhere" in capsys.readouterr().err
    url = "s3://no-such-bucket-maestro/train"
    assert cli.main(["pretrain", "configs/demo.yaml", f"data.shards={url}"]) == 2
    assert url in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bench_step_compares_the_framework_step_with_a_plain_loop(precision, archive, capsys):
    argv = [
        "bench",
        "step",
        "configs/demo.yaml",
        *SMALL,
        f"data.shards={archive}",
        f"train.precision={precision}",
    ]
    assert cli.main([*argv, "--steps", "2", "--warmup", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["device"] == "cpu" and rep["precision"] == precision and rep["steps"] == 2
    assert rep["samples_per_s"] > 0 and rep["plain_samples_per_s"] > 0
    assert rep["tokens_per_s"] == pytest.approx(rep["samples_per_s"] * 45)  # aerial 9 + s2 36 tokens
    assert rep["batch_size"] == 2
    assert 0 < rep["mfu"] <= rep["mfu_compute"] < 1 and 0 <= rep["data_wait_frac"] < 1
    assert rep["optimizer"] == "AdamW (foreach)"  # fp32 weights on both sides, also in bf16
    # One recipe on both sides: the same weights, masks, precision and optimizer give the same
    # losses after three steps (bf16 compute under autocast on both).
    assert rep["loss"] == pytest.approx(rep["plain_loss"], rel=1e-4)


def test_summary_counts_skipped_samples_with_their_reason(tmp_path, small_run):
    """A damaged sample is skipped, never trained on, and the run summary says how many and why."""
    from shards.synth import write_synthetic

    write_synthetic(str(tmp_path / "a"), "treesatai_ts", samples=8, seed=0, max_dates=4, shard_samples=4)
    shard = sorted((tmp_path / "a" / "train").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    start = data.index(b"\x93NUMPY")  # the first array of the first sample: its header destroyed
    data[start : start + 64] = b"\xff" * 64
    shard.write_bytes(bytes(data))
    cfg = small_run("skips", f"data.shards={tmp_path / 'a' / 'train'}", "train.steps=2")
    summary = train(cfg)
    skipped = json.loads((tmp_path / "skips" / "summary.json").read_text())["skipped"]
    assert skipped == summary["skipped"] and skipped["total"] >= 1
    assert sum(skipped["reasons"].values()) == skipped["total"]
