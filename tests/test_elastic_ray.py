"""Elastic pretraining on a real multi-node Ray cluster on one machine: `run.workers=[1,3]` on a
head (no CPUs) and three worker nodes of one CPU each (`ray.cluster_utils.Cluster`, every node
its own raylet on 127.0.0.1).

Two runs of the same config and seed share the cluster (module fixtures):
- a SIGTERM to one worker's process: a checkpoint at the next log step and at each one after,
  training going on in the same worker group (this run is also the uninterrupted reference);
- one run through three cluster changes: a worker node removed (its raylet and workers stopped),
  and the run goes on with fewer workers by itself; a node added back, and it grows; a node
  drained as a cloud autoscaler drains a spot node (reason preemption, with a deadline) and taken
  away before the deadline: a checkpoint on the notice, at most one log interval redone.

Every rank keeps a ledger of the samples of each step (`Ledger`, a test hook), so the tests see
what was trained: the final step, the global batch of every step, every sample of each epoch
once, the learning rate of the run's own schedule, and a loss within noise of the reference.

Timing does not decide the outcome: the hooks hold rank 0 at a step until the cluster change the
test makes has been seen (a file the driver writes, the notice in Ray Train's worker context, the
world size of the group that follows), never for a fixed guess of how long Ray takes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import SMALL_TRAIN, lr_schedule

from cluster.launch import launch, worker_entry
from maestro import config, local_ray
from maestro.train import checkpoint

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 6  # 1 × 6, 2 × 3 or 3 × 2 micro-batches of one sample
STEPS = 24
SAMPLES = 16
CHANGE_AT = 5  # the step at which each test changes the cluster
RUN = [
    *SMALL_TRAIN,  # the shared small run, here on one to three workers of one sample each
    "data.batch_size=1",
    "run.workers=[1,3]",
    f"train.global_batch={GLOBAL_BATCH}",
    "run.max_failures=8",
    "run.resize_check_s=1",
    f"train.steps={STEPS}",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.image_every=1000",
]
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
WAIT_S = 240  # the most any hook or driver action waits for the cluster (a bound, not a timing)


@contextlib.contextmanager
def loopback_cluster():
    """A head without CPUs (the driver, Ray Train's controller) and three one-CPU worker nodes, all
    on 127.0.0.1, joined by this process: yields (cluster, worker nodes)."""
    import ray
    import ray._private.ray_constants as ray_constants
    import ray.cloudpickle
    from ray.cluster_utils import Cluster

    env = {
        local_ray.LOCAL_ONLY_ENV: "0",  # every service on 127.0.0.1 (see maestro.local_ray)
        # The nodes' processes (Ray Train's controller among them) inherit these. Ray Train looks
        # for drained nodes every 5 s by default.
        "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
        # Right after a node goes, Ray Train 2.60 still sees it for up to 20 s (its resource
        # coordinator refreshes the node list on that tick) and first asks for a placement group
        # of the old size, which waits this long before it gives up and takes the smaller one
        # (60 s by default). Here a placement group of idle one-CPU nodes is ready in about 1 s.
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    enabled, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    # A node whose raylet is killed is declared dead after 5 missed health checks of 1 s (Ray's
    # default waits longer, and Ray Train would try to place a worker there meanwhile).
    checks = {
        "health_check_period_ms": 1000,
        "health_check_timeout_ms": 3000,
        "health_check_failure_threshold": 5,
    }
    head = {**NODE, "num_cpus": 0, "include_dashboard": False, "_system_config": checks}
    if ray.is_initialized():  # a Ray of an earlier test in this process
        ray.shutdown()
    # No exit hooks: they install a signal handler, which a node added from the test's thread
    # (while `launch` holds the main one) could not; the teardown below stops every node.
    cluster = Cluster(initialize_head=True, head_node_args=head, shutdown_at_exit=False)
    try:
        workers = [cluster.add_node(**NODE) for _ in range(3)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hooks below
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = enabled
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_archive(url: str) -> str:
    from shards.synth import write_synthetic

    write_synthetic(url, "treesatai_ts", samples=SAMPLES, seed=0, max_dates=4, shard_samples=2)
    return f"{url}/train"


@pytest.fixture(scope="module")
def ray_cluster(clean_group_env_module):
    """The cluster of this module's runs (no process-group variables of an earlier in-process
    run reach its nodes' environment)."""
    with loopback_cluster() as found:
        yield found


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_archive(str(tmp_path_factory.mktemp("archive")))


def wait_for(what: str, ok, timeout: float = WAIT_S) -> None:
    deadline = time.time() + timeout
    while not ok():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.1)


class Driver(threading.Thread):
    """The driver's side of a test: `act()` in a thread while `launch` runs; its failure is kept."""

    def __init__(self, act):
        super().__init__(daemon=True)
        self.act, self.failure = act, None

    def run(self) -> None:
        try:
            self.act()
        except BaseException as e:  # raised in the test by `done`
            self.failure = e

    def done(self) -> None:
        self.join(timeout=WAIT_S)
        if self.failure is not None:
            raise self.failure


class Ledger:
    """Every rank appends one line per step: its attempt (one per worker group, from rank 0), the
    world size, its pid, the time and the `[epoch, key]` of each sample it trained; then rank 0
    calls `hold(world, step, folder)`, the test's way to keep the run at a step until the cluster
    change it makes has been seen."""

    def __init__(self, folder: str, hold):
        self.folder, self.hold, self.attempt = folder, hold, None

    def __call__(self, step: int, engine, batches) -> None:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if self.attempt is None:  # the first step of this worker group
            box = [time.time_ns()]
            torch.distributed.broadcast_object_list(box, src=0)
            self.attempt = box[0]
        samples = [[int(b["_epoch"]), k] for b in batches for k in b["_keys"]]
        line = {
            "attempt": self.attempt,
            "step": step,
            "world": world,
            "rank": rank,
            "pid": os.getpid(),
            "time": time.time(),
            "samples": samples,
        }
        with open(f"{self.folder}/rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if rank == 0:
            self.hold(world, step, self.folder)


def read_ledger(folder: Path) -> list[dict]:
    lines = []
    for f in sorted(folder.glob("rank*.jsonl")):
        for x in f.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line being written
                lines.append(json.loads(x))
    return sorted(lines, key=lambda x: (x["time"], x["step"]))


def trained(lines: list[dict]) -> dict[int, list[dict]]:
    """Each step's lines from the last worker group that ran it: what the final weights saw."""
    last: dict[int, int] = {}
    for x in lines:
        last[x["step"]] = max(last.get(x["step"], 0), x["attempt"])
    out: dict[int, list[dict]] = {}
    for x in lines:
        if x["attempt"] == last[x["step"]]:
            out.setdefault(x["step"], []).append(x)
    return out


def groups(lines: list[dict]) -> list[tuple[int, int]]:
    """(attempt, world size) of each worker group, in order."""
    out: list[tuple[int, int]] = []
    for x in sorted(lines, key=lambda x: x["attempt"]):
        if not out or out[-1][0] != x["attempt"]:
            out.append((x["attempt"], x["world"]))
    return out


def assert_trained_as_one_run(steps: dict[int, list[dict]]) -> None:
    """Every step 1..STEPS by every rank of its group, GLOBAL_BATCH samples each, every sample of
    each epoch once."""
    assert sorted(steps) == list(range(1, STEPS + 1))
    for step, parts in steps.items():
        assert sorted(x["rank"] for x in parts) == list(range(parts[0]["world"])), f"step {step}"
        assert sum(len(x["samples"]) for x in parts) == GLOBAL_BATCH, f"step {step}"
    epochs: dict[int, list[str]] = {}
    for lines in steps.values():
        for x in lines:
            for epoch, key in x["samples"]:
                epochs.setdefault(epoch, []).append(key)
    for epoch, keys in epochs.items():
        assert len(keys) == len(set(keys)), f"epoch {epoch} trained a sample twice: {sorted(keys)}"
    # Ranks run through shares of unequal size at their own pace: the epochs before the one the
    # slowest rank ends in are complete.
    under_way = min(max(e for e, _ in x["samples"]) for x in steps[max(steps)])
    counts = {e: len(k) for e, k in sorted(epochs.items())}
    assert under_way >= 2 and all(counts[e] == SAMPLES for e in range(under_way)), (under_way, counts)


def events(run_url: str) -> dict[str, dict[int, float]]:
    """TensorBoard scalars by tag and step (a step redone after a restart: its last value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(f"{run_url}/tensorboard", size_guidance={"scalars": 0}).Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@dataclass
class Run:
    cfg: object
    summary: dict
    lines: list[dict]
    times: dict[str, float]
    log: str
    events: dict = field(default_factory=dict)


def run_on_cluster(tmp_path: Path, archive: str, name: str, hold, act, *overrides: str) -> Run:
    """`launch` a run of the test config on the cluster while `act(ledger, times)` changes it."""
    ledger = tmp_path / "ledger"
    ledger.mkdir(parents=True)
    cfg = config.load(
        "configs/demo.yaml",
        [*RUN, f"data.shards={archive}", f"run.storage={tmp_path}", f"run.name={name}", *overrides],
    )
    times: dict[str, float] = {}
    changes = Driver(lambda: act(ledger, times))
    changes.start()
    summary = launch(cfg, functools.partial(worker_entry, on_step=Ledger(str(ledger), hold)))
    changes.done()
    log = (Path(summary["run"]) / "logs" / "driver.log").read_text()
    return Run(cfg, summary, read_ledger(ledger), times, log, events(summary["run"]))


def reached(ledger: Path, world: int, step: int, after: float = 0.0) -> bool:
    return any(x["world"] == world and x["step"] >= step and x["time"] > after for x in read_ledger(ledger))


def assert_schedule_and_batch(run: Run) -> None:
    assert run.summary["step"] == STEPS and run.summary["global_batch"] == GLOBAL_BATCH
    assert set(run.events["train/global_batch"].values()) == {GLOBAL_BATCH}
    expected = lr_schedule(run.cfg)
    assert run.events["train/lr"] == pytest.approx({s: expected[s] for s in run.events["train/lr"]})
    assert sorted(run.events["train/loss"]) == list(range(2, STEPS + 1, 2))


def assert_loss_within_noise(run: Run, reference: Run) -> None:
    """The loss over the second half of the run against the uninterrupted one's: the two means
    differ by less than 3 standard deviations of the reference's own step-to-step noise there."""
    half = [s for s in reference.events["train/loss"] if s > STEPS // 2]
    ref = [reference.events["train/loss"][s] for s in half]
    got = [run.events["train/loss"][s] for s in half]
    noise = statistics.stdev(ref)
    assert abs(statistics.mean(got) - statistics.mean(ref)) < 3 * noise, (got, ref)


# --- a SIGTERM to a worker: the reference run ------------------------------------------------------


def hold_for_sigterm(world: int, step: int, folder: str) -> None:
    """At step CHANGE_AT, until the driver has sent the signal (and a second for it to land)."""
    if step == CHANGE_AT:
        wait_for("the SIGTERM", lambda: os.path.exists(f"{folder}/signalled"))
        time.sleep(1.0)


@pytest.fixture(scope="module")
def sigterm_run(ray_cluster, archive, tmp_path_factory) -> Run:
    def act(ledger: Path, times: dict) -> None:
        wait_for("step 5 on 3 workers", lambda: reached(ledger, 3, CHANGE_AT))
        pid = next(x["pid"] for x in read_ledger(ledger) if x["rank"] == 2)
        os.kill(pid, signal.SIGTERM)  # what a spot VM's shutdown sends the processes on it
        times["signalled"] = time.time()
        (ledger / "signalled").touch()

    return run_on_cluster(
        tmp_path_factory.mktemp("sigterm"),
        archive,
        "sigterm",
        hold_for_sigterm,
        act,
        "train.checkpoint_every=100",
    )


def test_a_sigterm_to_a_worker_checkpoints_at_the_next_log_step_and_training_goes_on(sigterm_run):
    run = sigterm_run
    assert [w for _, w in groups(run.lines)] == [3]  # one worker group: nothing restarted
    assert "preemption notice: rank(s) [2] received SIGTERM" in run.log
    assert f"checkpoint at step {CHANGE_AT + 1} and at each log step until it goes" in run.log
    store = checkpoint.CheckpointStore(run.summary["run"], keep=3)
    assert store.complete_steps() == [STEPS - 4, STEPS - 2, STEPS]  # one per log step (3 kept)
    assert all(store.verify(s) is None for s in store.complete_steps())
    assert_trained_as_one_run(trained(run.lines))
    assert_schedule_and_batch(run)


# --- a node lost, one added, then a node drained and taken: one run -------------------------------

DRAIN_AT = 15  # on 3 workers again: the step at which a node is drained


def hold_for_changes(world: int, step: int, folder: str) -> None:
    """Rank 0's waits, each until the cluster change the driver makes has been seen:
    on 3 workers at step CHANGE_AT until a node is gone (the group fails under the wait);
    on 2 at step DRAIN_AT - 3 until a node is back (the group grows under the wait);
    on 3 again at DRAIN_AT until the drain's notice has reached this worker (so the next log step
    sees it), then slow steps until the drained node is gone."""
    if world == 3 and step == CHANGE_AT and not os.path.exists(f"{folder}/removed"):
        wait_for("the lost node", lambda: False)
    elif world == 2 and step == DRAIN_AT - 3 and not os.path.exists(f"{folder}/drained"):
        wait_for("the grown group", lambda: False)
    elif world == 3 and step == DRAIN_AT and os.path.exists(f"{folder}/added"):
        from ray.train.v2._internal.execution.context import get_train_context

        wait_for("the notice", lambda: get_train_context().preemption_context.preemption_info is not None)
    elif world == 3 and step > DRAIN_AT and os.path.exists(f"{folder}/drained"):
        time.sleep(0.5)


@pytest.fixture(scope="module")
def elastic_run(ray_cluster, archive, tmp_path_factory, sigterm_run) -> Run:
    import ray
    from ray.core.generated import autoscaler_pb2

    cluster, workers = ray_cluster

    def act(ledger: Path, times: dict) -> None:
        wait_for("step 5 on 3 workers", lambda: reached(ledger, 3, CHANGE_AT))
        (ledger / "removed").touch()
        # The raylet stopped (SIGTERM) and with it the node's workers. (Killed outright, the node
        # is declared dead after missed health checks: the same shrink, seconds later.)
        cluster.remove_node(workers.pop(), allow_graceful=True)
        times["removed"] = time.time()
        wait_for("a step on 2 workers", lambda: reached(ledger, 2, 0, after=times["removed"]))
        (ledger / "added").touch()
        workers.append(cluster.add_node(**NODE))
        times["added"] = time.time()
        wait_for(
            "the grown group at the drain step", lambda: reached(ledger, 3, DRAIN_AT, after=times["added"])
        )
        node = workers.pop()
        accepted, why = ray._raylet.GcsClient(address=cluster.address).drain_node(
            node.node_id,
            autoscaler_pb2.DrainNodeReason.DRAIN_NODE_REASON_PREEMPTION,
            "spot instance reclaimed (test)",
            int((time.time() + 60) * 1000),  # the deadline the cloud gives
        )
        assert accepted, why
        (ledger / "drained").touch()
        times["drained"] = time.time()
        # The cloud takes the node once the run has checkpointed on the notice and gone on.
        wait_for("training after the notice", lambda: reached(ledger, 3, DRAIN_AT + 4, after=times["added"]))
        cluster.remove_node(node, allow_graceful=True)  # the VM shut down by the cloud
        times["taken"] = time.time()

    run = run_on_cluster(tmp_path_factory.mktemp("elastic"), archive, "elastic", hold_for_changes, act)
    workers.append(cluster.add_node(**NODE))  # the cluster as it was
    return run


def test_a_lost_node_shrinks_the_run_and_a_node_added_grows_it_with_the_global_batch_kept(
    elastic_run, sigterm_run
):
    run = elastic_run
    sizes = [w for _, w in groups(run.lines)]
    changes = [w for i, w in enumerate(sizes) if i == 0 or w != sizes[i - 1]]
    assert changes == [3, 2, 3, 2], sizes  # shrank, grew back, and shrank when the drained node went
    assert "was written by 3 workers, this run has 2: loading its universal form" in run.log
    assert "2 worker(s) × 3 micro-batch(es) of 1: global batch 6" in run.log
    assert "was written by 2 workers, this run has 3: loading its universal form" in run.log
    assert_trained_as_one_run(trained(run.lines))
    assert_schedule_and_batch(run)
    assert {2.0, 3.0} <= set(run.events["run/workers"].values())
    assert_loss_within_noise(run, sigterm_run)


def test_a_preemption_notice_writes_a_checkpoint_before_the_node_goes(elastic_run):
    """The node is drained as a cloud autoscaler drains a spot node (reason preemption, with a
    deadline) and taken once training has gone on: the group that follows redoes at most the
    steps between two polls (one log interval)."""
    run = elastic_run
    drained, taken = run.times["drained"], run.times["taken"]
    noticed = next(x["attempt"] for x in run.lines if drained < x["time"] < taken)
    following = next(x["attempt"] for x in run.lines if x["time"] > taken and x["attempt"] != noticed)
    before = [x for x in run.lines if x["attempt"] == noticed]
    after = [x for x in run.lines if x["attempt"] == following]
    assert before[0]["world"] == 3 and after[0]["world"] == 2
    assert "preemption notice: node(s)" in run.log and "to be preempted by" in run.log
    assert f"checkpoint at step {DRAIN_AT + 1} and at each log step until it goes" in run.log
    resumed = min(x["step"] for x in after) - 1  # the checkpoint the next group started from
    # The node went after step DRAIN_AT + 4: the periodic checkpoint at DRAIN_AT + 1 = 16 would
    # leave 3 or more steps to redo; the notice's at each log step leave at most one interval.
    assert resumed >= DRAIN_AT + 3
    redone = max(x["step"] for x in before) - resumed
    assert 0 <= redone <= run.cfg.train.log_every, (max(x["step"] for x in before), resumed)
    store = checkpoint.CheckpointStore(run.summary["run"], keep=3)
    assert all(store.verify(s) is None for s in store.complete_steps())
