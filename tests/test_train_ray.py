"""Pretraining through Ray Train with 2 local workers on gloo: ZeRO 2 (1 and 3 on spawned ranks),
a stopped run resumed on S3 that loses a worker, a worker's maestro error, a local Ray bound to
127.0.0.1. (`maestro pretrain`'s terminal is checked by the README example it runs,
tests/test_shards_own_readme.py.)

Each `launch` costs a worker group's start-up (about 13 s on 2 cores), so the launches are few and
short: the debug model size with smaller aerial tiles and fewer dates.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SMALL_TRAIN, lr_schedule, spawn_ranks

from cluster.launch import launch, start_local_ray, worker_entry
from maestro import config
from maestro.errors import CheckpointError, ConfigError
from maestro.parallel.deepspeed import safe_load
from maestro.train import checkpoint
from maestro.train.loop import train

pytestmark = pytest.mark.slow

# The shared small run (conftest's SMALL_TRAIN) on two workers with every modality and one
# data-loader process each.
SMALL = [
    *SMALL_TRAIN,
    "data.inputs=[aerial,s2,s1_asc,s1_des]",
    "data.modalities.s1_asc.num_dates=2",
    "data.modalities.s1_des.num_dates=2",
    "data.workers=1",
    "run.workers=2",
    "train.log_every=2",
]
METRICS = [
    "train/loss",
    "train/loss/aerial",
    "train/loss/s2",
    "train/loss/s1_asc",
    "train/loss/s1_des",
    "train/lr",
    "train/grad_norm",
    "perf/samples_per_s",
    "perf/tokens_per_s",
    "perf/mfu",
    "perf/data_wait_frac",
    "perf/step_time_s",
    "mem/peak_gb",
    "data/skipped_samples",
]


@pytest.fixture(scope="module")
def ray_local(s3_endpoint, tmp_path_factory):
    """One local Ray for the module, started as `maestro pretrain` starts it (after the S3
    variables are set, so workers inherit them)."""
    import ray
    import ray.cloudpickle

    start_local_ray(2, 0, str(tmp_path_factory.mktemp("ray")))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test hooks below
    yield
    ray.shutdown()


def test_local_ray_listens_on_the_loopback_interface_only(ray_local):
    import psutil

    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.setdefault(proc.name(), set()).add(conn.laddr.ip)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    assert {"gcs_server", "raylet"} <= set(found), found  # the services the check must see
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    assert all(ips <= loopback for ips in found.values()), found


def _archive(url: str) -> str:
    from shards.synth import write_synthetic

    write_synthetic(url, "treesatai_ts", samples=16, seed=0, max_dates=4, shard_samples=2)
    return f"{url}/train"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return _archive(str(tmp_path_factory.mktemp("archive")))


def _cfg(shards: str, storage: str, name: str, *extra: str):
    return config.load(
        "configs/demo.yaml",
        [*SMALL, f"data.shards={shards}", f"run.storage={storage}", f"run.name={name}", *extra],
    )


def _events(run_url: str, tmp_path) -> dict[str, dict[int, float]]:
    """Scalars of the run's TensorBoard files (copied down first when they live on S3)."""
    import fsspec
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fs, path = fsspec.core.url_to_fs(f"{run_url}/tensorboard")
    local = tmp_path / "tb"
    fs.get(f"{path}/", f"{local}/", recursive=True)
    acc = EventAccumulator(str(local), size_guidance={"scalars": 0, "images": 0}).Reload()
    out = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    out["images"] = acc.Tags()["images"]
    return out


@pytest.mark.parametrize("stage, via", [(1, "ranks"), (2, "ray"), (3, "ranks")])
def test_two_workers_train_with_zero_stage_and_loss_falls(
    stage, via, request, archive, tmp_path, clean_group_env
):
    """Two workers at ZeRO `stage`: through Ray Train (`launch`, stage 2) or, for the other stages,
    as two spawned ranks over gloo (the same `train` on the same engine; Ray's part is the same at
    every stage and costs a worker group's start-up per run)."""
    cfg = _cfg(archive, str(tmp_path), "zero", f"train.zero_stage={stage}", "train.steps=8",
               "train.checkpoint_every=4", "train.image_every=4")  # fmt: skip
    if via == "ray":
        request.getfixturevalue("ray_local")
        summary = launch(cfg)
    else:
        summary = spawn_ranks(cfg, tmp_path)
    assert summary["step"] == 8 and summary["start_step"] == 0
    ev = _events(summary["run"], tmp_path)
    loss = ev["train/loss"]
    assert sorted(loss) == [2, 4, 6, 8]
    assert loss[8] < loss[2] * 0.9
    assert set(METRICS) <= set(ev), sorted(ev)
    assert sorted(ev["images"]) == [f"images/{m}" for m in ("aerial", "s1_asc", "s1_des", "s2")]
    assert 0 < ev["perf/mfu"][8] < 1 and 0 <= ev["perf/data_wait_frac"][8] < 1
    store = checkpoint.CheckpointStore(summary["run"], keep=3)
    assert store.complete_steps() == [4, 8]
    files = set(os.listdir(tmp_path / "zero" / checkpoint.tag(8)))
    per_rank = {"rank0_data.pt", "rank1_data.pt"}
    if stage == 3:
        per_rank |= {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)}
        per_rank |= {"rank0_ema.pt", "rank1_ema.pt"}
    else:
        per_rank |= {"mp_rank_00_model_states.pt", "ema.pt"}
    assert per_rank <= files, files
    for name in sorted(f for f in files if f.endswith(".pt")):  # every file loads weights-only
        safe_load(str(tmp_path / "zero" / checkpoint.tag(8) / name), "cpu")
    # Elastic restart: the run resumes with one worker from its step-4 checkpoint, in the universal
    # form (ZeRO stage kept; the EMA's ZeRO-3 partitions re-split), schedule and loss continuing.
    shutil.rmtree(tmp_path / "zero" / checkpoint.tag(8))
    shutil.rmtree(tmp_path / "zero" / "tensorboard")  # what follows is the resumed run's alone
    # In this process, which holds Ray's and gloo's threads, a forked data-loader worker can hang on a
    # lock held at fork time (seen: a stage-1 resume waiting 15 min on it); the loader reads in process.
    one = _cfg(archive, str(tmp_path), "zero", f"train.zero_stage={stage}", "train.steps=8", "run.workers=1",
               "data.workers=0", "train.checkpoint_every=4", "train.image_every=100")  # fmt: skip
    resumed = train(one)
    assert resumed["start_step"] == 4 and resumed["step"] == 8
    assert store.complete_steps() == [4, 8]
    assert os.path.exists(tmp_path / "zero" / checkpoint.tag(4) / checkpoint.UNIVERSAL / checkpoint.MARKER)
    ev = _events(summary["run"], tmp_path / "after")
    assert sorted(ev["train/loss"]) == [6, 8] and ev["train/loss"][8] < loss[2] * 0.9
    assert ev["train/lr"][8] == pytest.approx(lr_schedule(cfg)[8])  # the run's own schedule goes on
    with pytest.raises(CheckpointError, match="train.steps=8"):
        train(_cfg(archive, str(tmp_path), "zero", "train.steps=12", "run.workers=1"))


class KillOnce:
    """SIGKILL rank 1 after `step` on the first attempt only (a marker file remembers), once the
    checkpoint at step `after` is complete in `run`. Its writer threads commit it while training
    goes on and meet in a collective: a rank killed before that leaves it incomplete, rightly,
    and the restart takes the one before (seen on 2 cores: the resume started at step 2)."""

    def __init__(self, marker: str, step: int, run: str, after: int):
        self.marker, self.step, self.run, self.after = marker, step, run, after

    def __call__(self, step: int, engine, batches) -> None:
        if step == self.step and torch.distributed.get_rank() == 1 and not os.path.exists(self.marker):
            store = checkpoint.CheckpointStore(self.run, keep=3)
            deadline = time.time() + 120
            while self.after not in store.complete_steps():
                assert time.time() < deadline, f"checkpoint {self.after} not complete after 120 s"
                time.sleep(0.1)
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


class InterruptDriver:
    """Rank 0 sends SIGINT to the driver (as Ctrl-C would) after `step`."""

    def __init__(self, driver_pid: int, step: int):
        self.driver_pid, self.step = driver_pid, step

    def __call__(self, step: int, engine, batches) -> None:
        if step == self.step and torch.distributed.get_rank() == 0:
            os.kill(self.driver_pid, signal.SIGINT)


def test_stopped_run_resumes_by_name_on_s3_and_a_killed_worker_is_restarted(ray_local, s3_bucket, tmp_path):
    """Shards and checkpoints on S3. The first launch is stopped (Ctrl-C on the driver) and writes a
    checkpoint; the second resumes it by name, loses rank 1 to SIGKILL after step 5, is restarted
    by Ray Train (`run.max_failures=1`) from its newest complete checkpoint (step 4) and finishes,
    the learning rate following the run's own one-cycle schedule throughout."""
    shards = _archive(f"s3://{s3_bucket}/archive")
    storage = f"s3://{s3_bucket}/runs"
    cfg = _cfg(shards, storage, "s3run", "train.steps=10", "train.checkpoint_every=4", "run.max_failures=1")
    first = launch(cfg, functools.partial(worker_entry, on_step=InterruptDriver(os.getpid(), step=2)))
    assert first["stopped"] and 2 <= first["step"] < 10
    store = checkpoint.CheckpointStore(f"{storage}/s3run", keep=3)
    stopped_at = first["step"]
    assert store.complete_steps() == sorted({stopped_at} | {s for s in (4, 8) if s < stopped_at})
    kill_after = max(stopped_at, 4) + 1  # past a checkpoint the second launch writes itself
    newest_before_kill = max(s for s in (stopped_at, 4, 8) if s < kill_after)
    marker = str(tmp_path / "killed")
    kill = KillOnce(marker, step=kill_after, run=f"{storage}/s3run", after=newest_before_kill)
    second = launch(cfg, functools.partial(worker_entry, on_step=kill))
    assert os.path.exists(marker)
    assert second["start_step"] == newest_before_kill and second["step"] == 10 and not second["stopped"]
    assert store.complete_steps()[-1] == 10 and newest_before_kill in store.complete_steps()
    ev = _events(second["run"], tmp_path)
    assert sorted(ev["train/loss"]) == [2, 4, 6, 8, 10]
    # The learning rate continues the one-cycle schedule instead of restarting it.
    expected = lr_schedule(cfg)
    assert ev["train/lr"] == pytest.approx({s: expected[s] for s in ev["train/lr"]})


class RaiseOnce:
    """Rank 1 raises a ConfigError after `step`, counting its calls in a file (one line per raise)."""

    def __init__(self, tally: str, step: int):
        self.tally, self.step = tally, step

    def __call__(self, step: int, engine, batches) -> None:
        if step == self.step and torch.distributed.get_rank() == 1:
            with open(self.tally, "a") as f:
                f.write("raised\n")
            raise ConfigError("data.inputs", "dem", "modalities stored in the shards (['aerial', 's2'])")


def test_worker_config_error_ends_the_run_at_once_with_its_message(ray_local, archive, tmp_path):
    """A maestro error in a worker reaches the driver whole (it pickles) and is not retried: the
    restarted workers find it recorded and return, though run.max_failures would allow 3 restarts."""
    tally = str(tmp_path / "tally")
    cfg = _cfg(
        archive, str(tmp_path), "bad", "train.steps=4", "train.checkpoint_every=4", "run.max_failures=3"
    )
    with pytest.raises(ConfigError) as info:
        launch(cfg, functools.partial(worker_entry, on_step=RaiseOnce(tally, step=1)))
    assert str(info.value) == (
        "config key 'data.inputs': got 'dem'; expected modalities stored in the shards (['aerial', 's2'])"
    )
    assert Path(tally).read_text().count("raised") == 1
    assert (tmp_path / "bad" / "logs" / "driver.log").exists()
