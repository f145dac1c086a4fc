"""Elastic-training figures on this machine (CPU): checkpoint stalls and the cost of resizes.

    python -m benchmarks.elastic stall [--size base] [--saves 3]
    python -m benchmarks.elastic cluster [--steps 45] [--every 15] [--size tiny]

`stall`: one training process of `--size` (DeepSpeed on gloo, the real `Trainer`) saves its
checkpoint alternately in step (`train.checkpoint_async=false`) and in the background, the same
engine state each time: the seconds each save holds training (the stall), the seconds the
background writer takes, and the step time while it writes against a step without a write.

`cluster`: a `ray.cluster_utils.Cluster` on 127.0.0.1 (a head without CPUs and three one-CPU
worker nodes, as in `tests/test_elastic_ray.py`, whose helpers and Ray settings it uses) runs the
tiny model (`--size`) with `run.workers=[1,3]`:
- `--steps` steps with no change (the baseline wall time);
- the same with a node lost every `--every` steps (its raylet killed) and a replacement added once
  the run trains on fewer workers, as a spot pool replaces capacity: wall time against the
  baseline (goodput), steps redone per loss, seconds from a node loss to the first step at the
  smaller size and from a node added to the first step at the larger one;
- one node drained as a preemption (a notice with a deadline), then taken: steps redone.

Prints one JSON object. The machine's load is printed with it: these are wall-clock seconds on
shared cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stall(size: str, saves: int) -> dict:
    import torch

    from maestro import config
    from maestro.parallel import dist
    from maestro.train import checkpoint, loop
    from shards.synth import write_synthetic

    work = tempfile.mkdtemp(prefix="maestro-bench-stall-")
    write_synthetic(work, "treesatai_ts", samples=8, seed=0, max_dates=4, shard_samples=4)
    cfg = config.load(
        str(REPO / "configs/demo.yaml"),
        [
            f"model.size={size}",
            "data.modalities.aerial.image_size=60",
            "data.modalities.s2.num_dates=4",
            "data.inputs=[aerial,s2]",
            "data.batch_size=1",
            "data.workers=0",
            "run.workers=1",
            "run.use_gpu=false",
            "train.steps=1000",
            "train.keep_checkpoints=1",
            f"data.shards={work}/train",
            f"run.storage={work}/runs",
            "run.name=stall",
        ],
    )
    place = dist.init(False)
    out: dict = {"size": size, "sync": [], "async": []}
    try:
        trainer = loop.Trainer(cfg, place, None)
        writer = trainer.writer
        assert writer is not None
        batches = iter(trainer.loader)
        step = saved = 0

        def train_step() -> float:
            nonlocal step
            t = time.perf_counter()
            trainer.stepper(step, [next(batches)])
            step += 1
            return time.perf_counter() - t

        for _ in range(2):
            train_step()
        out["params"] = sum(p.numel() for p in trainer.engine.module.parameters())
        out["step_s"] = min(train_step() for _ in range(3))
        for _ in range(saves):
            trainer.writer = None
            t = time.perf_counter()
            trainer.save(step)
            out["sync"].append({"stall_s": time.perf_counter() - t})
            train_step()
            trainer.writer = writer
            t, saved = time.perf_counter(), step
            trainer.save(step)
            entry = {"stall_s": time.perf_counter() - t}
            during = []
            while writer.busy():
                during.append(train_step())
            trainer.finish_writes()
            entry.update(write_s=writer.write_s, steps_during_write=len(during))
            if during:
                entry["step_s_during_write"] = sum(during) / len(during)
            out["async"].append(entry)
            train_step()
        name = checkpoint.tag(saved)
        out["checkpoint_bytes"] = sum(
            f.stat().st_size for f in (Path(work) / "runs" / "stall" / name).iterdir() if f.is_file()
        )
        trainer.close()
    finally:
        dist.shutdown()
    sync = min(x["stall_s"] for x in out["sync"])
    background = min(x["stall_s"] for x in out["async"])
    out["summary"] = {
        "sync_stall_s": sync,
        "async_stall_s": background,
        "stall_ratio_async_to_sync": background / sync,
        "async_write_s": min(x["write_s"] for x in out["async"]),
    }
    del torch
    return out


def cluster(steps: int, every: int, size: str) -> dict:
    import contextlib

    sys.path.insert(0, str(REPO / "tests"))
    import test_elastic_ray as E  # the test's cluster, ledger and helpers

    from cluster.launch import launch, worker_entry
    from maestro import config

    overrides = [o for o in E.RUN if not o.startswith(("train.steps=", "model.size="))]
    overrides += [f"train.steps={steps}", f"model.size={size}"]
    work = Path(tempfile.mkdtemp(prefix="maestro-bench-elastic-"))
    archive = E.write_archive(str(work / "archive"))
    figures: dict = {"steps": steps, "every": every, "size": size}

    def run(name: str, act, *extra: str) -> tuple[float, list[dict], dict]:
        ledger = work / name / "ledger"
        ledger.mkdir(parents=True)
        cfg = config.load(
            str(REPO / "configs/demo.yaml"),
            [
                *overrides,
                f"data.shards={archive}",
                f"run.storage={work / name}",
                f"run.name={name}",
                *extra,
            ],
        )
        times: dict = {}
        driver = E.Driver(lambda: act(ledger, times))
        driver.start()
        t = time.perf_counter()
        launch(cfg, functools.partial(worker_entry, on_step=E.Ledger(str(ledger), lambda *a: None)))
        wall = time.perf_counter() - t
        driver.done()
        return wall, E.read_ledger(ledger), times

    with E.loopback_cluster() as (ray_cluster, workers):
        figures["baseline_wall_s"], _, _ = run("baseline", lambda ledger, times: None)

        def lose_every(ledger: Path, times: dict) -> None:
            times["losses"] = []
            for at in range(every, steps - every // 2, every):
                E.wait_for(f"step {at}", lambda at=at: any(x["step"] >= at for x in E.read_ledger(ledger)))
                world = E.read_ledger(ledger)[-1]["world"]
                lost = time.time()
                ray_cluster.remove_node(workers.pop(), allow_graceful=True)

                def smaller(lost: float = lost, world: int = world) -> bool:
                    lines = E.read_ledger(ledger)
                    return any(x["world"] < world and x["time"] > lost for x in lines) or any(
                        x["step"] == steps for x in lines
                    )

                E.wait_for("a smaller group", smaller)
                workers.append(ray_cluster.add_node(**E.NODE))
                times["losses"].append({"lost": lost, "added": time.time()})

        wall, lines, times = run("losses", lose_every)
        figures["with_losses_wall_s"] = wall
        figures["goodput_ratio"] = wall / figures["baseline_wall_s"]
        per = []
        for event in times["losses"]:
            before = [x for x in lines if x["time"] < event["lost"]]
            world = before[-1]["world"]
            shrunk = [x for x in lines if x["world"] < world and x["time"] > event["lost"]]
            grown = [x for x in lines if x["world"] == world and x["time"] > event["added"]]
            if not shrunk:  # the run ended first
                continue
            entry = {
                "steps_redone": max(x["step"] for x in before) - (min(x["step"] for x in shrunk) - 1),
                "loss_to_smaller_step_s": min(x["time"] for x in shrunk) - event["lost"],
            }
            if grown:
                entry["added_to_larger_step_s"] = min(x["time"] for x in grown) - event["added"]
                entry["steps_redone_on_growth"] = max(
                    x["step"] for x in shrunk if x["time"] < min(y["time"] for y in grown)
                ) - (min(x["step"] for x in grown) - 1)
            per.append(entry)
        figures["node_losses"] = per

        def drain(ledger: Path, times: dict) -> None:
            import ray
            from ray.core.generated import autoscaler_pb2

            E.wait_for("step 5", lambda: E.reached(ledger, 3, 5))
            node = workers.pop()
            ray._raylet.GcsClient(address=ray_cluster.address).drain_node(
                node.node_id,
                autoscaler_pb2.DrainNodeReason.DRAIN_NODE_REASON_PREEMPTION,
                "spot instance reclaimed (benchmark)",
                int((time.time() + 30) * 1000),
            )
            times["drained"] = time.time()
            E.wait_for("4 more steps", lambda: E.reached(ledger, 3, 9))
            ray_cluster.remove_node(node, allow_graceful=True)
            times["removed"] = time.time()
            workers.append(ray_cluster.add_node(**E.NODE))

        _, lines, times = run("drain", drain, "train.checkpoint_every=1000")
        first = min(x["attempt"] for x in lines)
        before = [x for x in lines if x["attempt"] == first]
        after = [x for x in lines if x["attempt"] != first]
        with contextlib.suppress(ValueError):
            figures["steps_redone_with_notice"] = max(x["step"] for x in before) - (
                min(x["step"] for x in after) - 1
            )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.elastic", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("stall")
    s.add_argument("--size", default="base")
    s.add_argument("--saves", type=int, default=3)
    c = sub.add_parser("cluster")
    c.add_argument("--steps", type=int, default=45)
    c.add_argument("--every", type=int, default=15)
    c.add_argument("--size", default="tiny")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load = os.getloadavg()
    result = (
        stall(args.size, args.saves) if args.what == "stall" else cluster(args.steps, args.every, args.size)
    )
    result["load_average_before"] = load
    result["load_average_after"] = os.getloadavg()
    result["cpus"] = os.cpu_count()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
