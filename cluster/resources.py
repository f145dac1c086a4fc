"""Does the run fit? The workers a run asks for against the CPUs and GPUs the machine or cluster has.

Ray Train otherwise waits without end for a worker it cannot place (8 GPU workers asked on a
laptop wait forever); this check fails in seconds, saying what was asked, what exists and the
override that fits. Each worker needs `run.cpus_per_worker` CPUs and, with GPUs, one GPU on the
same node (NCCL does not share a GPU between two ranks).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from maestro import config, machine
from maestro.config import Config
from maestro.errors import ResourceError

Node = dict[str, float]  # Ray's resource names ("CPU", "GPU") to amounts on one node


def local_nodes() -> list[Node]:
    """This machine, as the one node a local Ray would have."""
    return [{"CPU": float(machine.cpus()), "GPU": float(machine.gpus())}]


def ray_nodes() -> list[Node]:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def room(nodes: list[Node], cpus_per_worker: int, gpu: bool) -> int:
    """How many workers of `cpus_per_worker` CPUs (and one GPU each with `gpu`) the nodes can hold."""
    total = 0
    for n in nodes:
        fit = int(n.get("CPU", 0) // cpus_per_worker)
        if gpu:
            fit = min(fit, int(n.get("GPU", 0)))
        total += fit
    return total


def _has(nodes: list[Node]) -> str:
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    return f"{int(cpus)} CPU(s) and {int(gpus)} GPU(s)" + (
        f" on {len(nodes)} nodes" if len(nodes) > 1 else ""
    )


def shortfall(cfg: Config, nodes: list[Node], where: str) -> str | None:
    """None when the run fits on `nodes`; else what was asked, what `where` has and what fits."""
    r, gpu = cfg.run, config.uses_gpu(cfg)
    need = config.worker_range(cfg)[0]  # an elastic run starts with its fewest and grows
    if room(nodes, r.cpus_per_worker, gpu) >= need:
        return None
    each = f"{r.cpus_per_worker} CPU(s)" + (" and 1 GPU" if gpu else "")
    asked = f"run.workers={r.workers} asks for {'at least ' if need != r.workers else ''}{need} worker(s) of {each} each"
    gpu_room, cpu_room = room(nodes, r.cpus_per_worker, True), room(nodes, r.cpus_per_worker, False)
    options = []
    if gpu_room:
        options.append(f"run.workers={min(need, gpu_room)} run.use_gpu=true")
    if cpu_room:
        options.append(f"run.workers={min(need, cpu_room)} run.use_gpu=false")
    fits = " or ".join(options) if options else "nothing: add nodes or free CPUs"
    advice = "; a GPU holds one worker (NCCL does not share GPUs between ranks)" if gpu and gpu_room else ""
    return f"{asked}; {where} has {_has(nodes)}. What fits: {fits}{advice}"


def check_local(cfg: Config) -> None:
    """Before starting a local Ray: the request against this machine (a local Ray is started with
    room for the most workers of the run: there is no capacity to come and go)."""
    most = config.worker_range(cfg)[1]
    missing = shortfall(
        dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, workers=most)),
        local_nodes(),
        "this machine",
    )
    if missing:
        raise ResourceError(f"{missing} (or add configs/local.yaml, which sets run.workers=auto)")


def check_cluster(cfg: Config, say: Callable[[str], None], poll_s: float = 5.0) -> None:
    """Once connected to a cluster: the request against its alive nodes, waiting up to
    `run.resource_wait_s` for an autoscaler to add nodes before failing."""
    deadline = time.monotonic() + cfg.run.resource_wait_s
    said = False
    while True:
        missing = shortfall(cfg, ray_nodes(), "the Ray cluster")
        if missing is None:
            return
        if time.monotonic() >= deadline:
            raise ResourceError(
                f"{missing}; run.resource_wait_s={cfg.run.resource_wait_s:g} lets an autoscaling cluster add nodes first"
            )
        if not said:
            say(f"waiting up to {cfg.run.resource_wait_s:g} s for the cluster: {missing}")
            said = True
        time.sleep(poll_s)
