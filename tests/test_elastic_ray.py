"""Elastic pretraining on a real multi-node Ray cluster on one machine: `run.workers=[1,3]` on a
head (no CPUs) and three worker nodes of one CPU each (`ray.cluster_utils.Cluster`, every node
its own raylet on 127.0.0.1).

A worker node is removed mid-run (its raylet and workers killed) and the run goes on with fewer
workers by itself; a node added back makes it grow. Every rank keeps a ledger of the samples of
each step (`Ledger`, a test hook), so the test sees what was trained: the final step, the global
batch of every step, every sample of each epoch once, and the learning rate of the run's own
schedule.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cluster.launch import launch, worker_entry
from maestro import config, local_ray
from maestro.train import optim

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 6  # 1 × 6, 2 × 3 or 3 × 2 micro-batches of one sample
STEPS = 24
RUN = [
    "model.size=debug",
    "model.inter_depth=1",
    "data.modalities.aerial.image_size=60",
    "data.modalities.s2.num_dates=4",
    "data.modalities.s1_asc.num_dates=2",
    "data.modalities.s1_des.num_dates=2",
    "data.batch_size=1",
    "data.workers=0",
    "run.workers=[1,3]",
    f"train.global_batch={GLOBAL_BATCH}",
    "run.use_gpu=false",
    "run.max_failures=3",
    "run.resize_check_s=2",
    "optim.base_lr=0.002",
    f"train.steps={STEPS}",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.image_every=1000",
]
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}


@pytest.fixture(scope="module")
def ray_cluster():
    """A head without CPUs (the driver, Ray Train's controller) and three one-CPU worker nodes."""
    import ray
    import ray._private.ray_constants as ray_constants
    import ray.cloudpickle
    from ray.cluster_utils import Cluster

    os.environ[local_ray.LOCAL_ONLY_ENV] = "0"  # every service on 127.0.0.1 (see maestro.local_ray)
    # Ray Train looks for drained nodes every 5 s by default; the nodes' processes inherit this.
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # A node whose raylet is killed is declared dead after 5 missed health checks of 1 s (Ray's
    # default waits longer, and Ray Train would try to place a worker there meanwhile).
    checks = {
        "health_check_period_ms": 1000,
        "health_check_timeout_ms": 3000,
        "health_check_failure_threshold": 5,
    }
    head = {**NODE, "num_cpus": 0, "include_dashboard": False, "_system_config": checks}
    # No exit hooks: they install a signal handler, which a node added from the test's thread
    # (while `launch` holds the main one) could not; the teardown below stops every node.
    cluster = Cluster(initialize_head=True, head_node_args=head, shutdown_at_exit=False)
    try:
        workers = [cluster.add_node(**NODE) for _ in range(3)]
        ray.init(address=cluster.address, log_to_driver=False)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hooks below
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from shards.synth import write_synthetic

    url = str(tmp_path_factory.mktemp("archive"))
    write_synthetic(url, "treesatai_ts", samples=16, seed=0, max_dates=4, shard_samples=2)
    return f"{url}/train"


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
        self.join(timeout=120)
        if self.failure is not None:
            raise self.failure


class Ledger:
    """Every rank appends one line per step: its attempt (one per worker group, from rank 0), the
    world size, the time and the `[epoch, key]` of each sample it trained. `hold(world, step)` says
    how long rank 0 waits after a step, so that the cluster changes before the run ends."""

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
            "time": time.time(),
            "samples": samples,
        }
        with open(f"{self.folder}/rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if rank == 0:
            time.sleep(self.hold(world, step, self.folder))


def read_ledger(folder: Path) -> list[dict]:
    lines = [json.loads(x) for f in sorted(folder.glob("rank*.jsonl")) for x in f.read_text().splitlines()]
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


def assert_each_sample_once_per_epoch(steps: dict[int, list[dict]], total: int) -> None:
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
    assert under_way >= 2 and all(counts[e] == total for e in range(under_way)), (under_way, counts)


def schedule(cfg) -> dict[int, float]:
    """The learning rate of each step under the run's one-cycle schedule, from step 1."""
    model = torch.nn.Linear(1, 1)
    opt = optim.build_optimizer(cfg, model)
    sched = optim.build_schedule(cfg, opt)
    out = {}
    for step in range(1, cfg.train.steps + 1):
        out[step] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    return out


def events(run_url: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(f"{run_url}/tensorboard", size_guidance={"scalars": 0}).Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def shrink_then_grow(world: int, step: int, folder: str) -> float:
    """Rank 0's wait: on 3 workers past step 5 until a node is gone (the driver removes one); on
    fewer, slow steps and, near the end, a long wait in which Ray grows the group back."""
    if world == 3 and step >= 5 and not os.path.exists(f"{folder}/removed"):
        return 0.5
    if world < 3:
        return 120.0 if step >= STEPS - 6 else 0.5
    return 0.0


def first_time(lines: list[dict], world: int, after: float) -> float:
    return min(x["time"] for x in lines if x["world"] == world and x["time"] > after)


def test_a_lost_node_shrinks_the_run_and_a_node_added_grows_it_with_the_global_batch_kept(
    ray_cluster, archive, tmp_path
):
    cluster, workers = ray_cluster
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    cfg = config.load(
        "configs/demo.yaml", [*RUN, f"data.shards={archive}", f"run.storage={tmp_path}", "run.name=elastic"]
    )
    times: dict[str, float] = {}

    def cluster_changes() -> None:
        """The driver's side: remove a worker node at step 5 on 3 workers; add one once the run
        trains on fewer."""
        while not any(x["world"] == 3 and x["step"] >= 5 for x in read_ledger(ledger)):
            time.sleep(0.2)
        node = workers.pop()
        cluster.remove_node(node, allow_graceful=False)
        times["removed"] = time.time()
        (ledger / "removed").touch()
        while not any(x["world"] < 3 and x["time"] > times["removed"] for x in read_ledger(ledger)):
            time.sleep(0.2)
        workers.append(cluster.add_node(**NODE))
        times["added"] = time.time()

    changes = Driver(cluster_changes)
    changes.start()
    summary = launch(cfg, functools.partial(worker_entry, on_step=Ledger(str(ledger), shrink_then_grow)))
    changes.done()
    assert summary["step"] == STEPS and summary["workers"] == 3 and summary["global_batch"] == GLOBAL_BATCH

    lines = read_ledger(ledger)
    groups = []  # the world size of each worker group, in order
    for x in lines:
        if not groups or groups[-1][0] != x["attempt"]:
            groups.append((x["attempt"], x["world"]))
    sizes = [w for _, w in groups]
    assert sizes[0] == 3 and 2 in sizes and sizes[-1] == 3, sizes  # shrank, then grew back
    steps = trained(lines)
    assert sorted(steps) == list(range(1, STEPS + 1))
    for step, parts in steps.items():
        assert len(parts) == parts[0]["world"], f"step {step}: {len(parts)} ranks of {parts[0]['world']}"
        assert sum(len(x["samples"]) for x in parts) == GLOBAL_BATCH, f"step {step}"
    assert_each_sample_once_per_epoch(steps, total=16)

    ev = events(summary["run"])
    assert set(ev["train/global_batch"].values()) == {GLOBAL_BATCH}
    assert {2.0, 3.0} <= set(ev["run/workers"].values())
    expected = schedule(cfg)
    assert ev["train/lr"] == pytest.approx({s: expected[s] for s in ev["train/lr"]})

    shrunk = [x for x in lines if x["world"] == 2]
    lost = max(x["step"] for x in lines if x["world"] == 3 and x["time"] < times["removed"])
    print(
        f"elastic figures: steps redone without a notice {lost - (min(x['step'] for x in shrunk) - 1)}; "
        "node loss -> first step on 2 workers "
        f"{first_time(lines, 2, times['removed']) - times['removed']:.1f} s; node added -> first step on "
        f"3 workers {first_time(lines, 3, times['added']) - times['added']:.1f} s"
    )
