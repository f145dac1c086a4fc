"""Resuming a run: which checkpoint, whether this config may continue it, and its state re-split.

Rank 0 plans (`plan`) and every rank follows: the newest complete checkpoint whose files match
their digests (when one fails, the file and the reason are printed, it is marked rejected, and the
next older one is tried); the resolved config compared with the checkpoint's, key by key (keys
that decide what the run computes must be equal, the others may change and are printed); the
ZeRO stage (a resumed run keeps its own); and whether the engine loads the checkpoint's universal
form (another world size at ZeRO 1-3; rank 0 converts it once). Nothing of the run is written
before the plan is accepted.

`restore` then loads each rank's part: the engine state, the data stream (a rank reads its own
saved state only when the saved layout of ranks and workers is this run's; otherwise every saved
rank's state is read and the loader re-splits them) and the EMA (ZeRO-3 partitions re-cut).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from maestro import config, storage
from maestro.config import Config
from maestro.errors import CheckpointError, MaestroError
from maestro.train import checkpoint

# Keys that may differ between a run and its resume: how the run is executed, logged and stored.
# Every other key (model, masks, loss, optimizer, schedule length, data and its layout, seeds)
# decides what the run computes, and changing one would mix two runs under one name.
CHANGEABLE = (
    "run.",  # workers, cluster address, GPUs, storage endpoint and credentials, retries
    "storage.",  # S3 timeouts, retry budget, block size and cache: how bytes are fetched
    "data.workers",
    "data.strict",
    "data.read_ahead",
    "train.grad_accum",
    "train.log_every",
    "train.image_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.checkpoint_async",
    "train.zero_stage",  # a resumed run keeps the stage it started with
    "model.attention",  # implementations of the same computation
    "model.kernels",
    "eval.",  # downstream evaluation settings (the in-loop probe only logs)
)
PRECISION = "precision (resolved)"  # `train.precision: auto` resolves per machine: compared as run


@dataclass(frozen=True)
class Plan:
    """What a resume starts from: checkpoint `step`, its `state.json`, the engine's ZeRO stage and
    whether it loads the universal form."""

    step: int
    state: dict[str, Any]
    stage: int
    universal: bool
    notes: tuple[str, ...] = ()  # what rank 0 prints: rejected checkpoints, accepted changes


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a.b.c": leaf}` of a nested mapping (lists are leaves)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{key}."))
        else:
            out[key] = v
    return out


def _precision(deepspeed: dict[str, Any]) -> str:
    bf16 = deepspeed.get("bf16", {}).get("enabled") or deepspeed.get("torch_autocast", {}).get("enabled")
    return "bf16" if bf16 else "fp32"


def _comparable(resolved: dict[str, Any]) -> dict[str, Any]:
    out = flat({k: v for k, v in resolved.items() if k != "derived"})
    shards = out.get("data.shards")
    if isinstance(shards, list):  # splits, some weighted: compared split by split
        out["data.shards"] = [[storage.absolute(u), w] for u, w in config.shard_sources(shards)]
    else:
        out["data.shards"] = storage.absolute(shards) if shards else ""
    out[PRECISION] = _precision(resolved.get("derived", {}).get("deepspeed", {}))
    return out


def compare(
    saved: dict[str, Any], cfg: Config, where: str, changeable: tuple[str, ...] = CHANGEABLE
) -> list[str]:
    """The changes from the checkpoint's resolved config `saved` to `cfg` that a resume accepts
    ("key old → new"); raises `CheckpointError` naming every key that cannot change (all but the
    prefixes `changeable`: pretraining's `CHANGEABLE`, or a downstream phase's own). Keys present on
    one side only (added or removed by a maestro upgrade) are not compared."""
    old, new = _comparable(saved), _comparable(cfg.to_dict())
    changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    fixed = [k for k in changed if not k.startswith(changeable)]
    if fixed:
        raise CheckpointError(
            f"cannot resume {where} with other values of {', '.join(fixed)}: it was trained with "
            f"{', '.join(f'{k}={old[k]}' for k in fixed)} (this config: {', '.join(f'{k}={new[k]}' for k in fixed)}) "
            "and these keys cannot change on resume; rerun with its values, or train the new ones under another run.name"
        )
    return [f"{k} {old[k]} → {new[k]}" for k in changed]


def check_config(cfg: Config, url: str, changeable: tuple[str, ...] = CHANGEABLE) -> list[str]:
    """`compare` against the newest complete checkpoint of run folder `url`, if any: for the
    launcher, so that a refused resume stops before any worker starts (read-only)."""
    store = checkpoint.CheckpointStore(url, cfg.train.keep_checkpoints)
    latest = store.latest()
    if latest is None:
        return []
    saved = yaml.safe_load(store.read(latest, "config.yaml"))
    return compare(saved, cfg, f"{url}/{checkpoint.tag(latest)}", changeable)


def _decide(
    cfg: Config, store: checkpoint.CheckpointStore, world_size: int, changeable: tuple[str, ...]
) -> Plan | None:
    """Rank 0's part of `plan`."""
    store.remove_partial()
    steps = store.complete_steps()
    if not steps:
        return None
    notes = []
    for step in reversed(steps):
        problem = store.verify(step)
        if problem is None:
            break
        store.reject(step, problem)
        notes.append(
            f"{store.url}/{checkpoint.tag(step)}: {problem}; not resuming from it (marked rejected, files kept)"
        )
    else:
        raise CheckpointError(
            f"no checkpoint of {store.url} matches its recorded digests ({'; '.join(notes)}); restore the "
            "files, or start again under another run.name"
        )
    where = f"{store.url}/{checkpoint.tag(step)}"
    if notes:
        notes.append(f"resuming from {where}, the newest checkpoint whose files verify")
    changes = compare(yaml.safe_load(store.read(step, "config.yaml")), cfg, where, changeable)
    if changes:
        notes.append(f"resuming {where} with changed settings: {'; '.join(changes)}")
    state = json.loads(store.read(step, "state.json"))
    stage = state["zero_stage"]
    # Stage 0 holds the whole optimizer state in one file: it loads at any world size.
    universal = state["world_size"] != world_size and stage > 0
    if universal:
        notes.append(
            f"{where} was written by {state['world_size']} workers, this run has {world_size}: "
            f"loading its universal form (ZeRO stage {stage} kept)"
        )
        store.make_universal(step)
    return Plan(step, state, stage, universal, tuple(notes))


def plan(
    cfg: Config,
    store: checkpoint.CheckpointStore,
    rank: int,
    world_size: int,
    changeable: tuple[str, ...] = CHANGEABLE,
) -> Plan | None:
    """The checkpoint this run resumes from (None: a fresh run), decided by rank 0 for every rank
    (every rank calls this); a refusal is raised on every rank. `changeable`: as in `compare`."""
    decided: list[Any] = [None]
    error: MaestroError | None = None
    if rank == 0:
        try:
            decided = [_decide(cfg, store, world_size, changeable)]
        except MaestroError as e:
            error, decided = e, [("refused", str(e))]
    torch.distributed.broadcast_object_list(decided, src=0)
    if error is not None:
        raise error
    if isinstance(decided[0], tuple):
        raise CheckpointError(decided[0][1])
    return decided[0]


def data_states(store: checkpoint.CheckpointStore, p: Plan, loader: Any, rank: int, world_size: int) -> None:
    """Resume this rank's data stream from checkpoint `p`."""
    saved_world = p.state["world_size"]
    own = None
    if saved_world == world_size:  # only then does this rank's own state exist and apply
        own = checkpoint.decode(store.read(p.step, f"rank{rank}_data.pt"))
        if own["workers"] == loader.plan.workers:
            loader.load_state_dict(own)
            return
    states = [
        own if own is not None and r == rank else checkpoint.decode(store.read(p.step, f"rank{r}_data.pt"))
        for r in range(saved_world)
    ]
    loader.resume(states)


def ema_name(stage: int, rank: int) -> str:
    """The EMA's file: one per rank under ZeRO-3 (partitions), else one for the run."""
    return f"rank{rank}_ema.pt" if stage == 3 else "ema.pt"


def ema_state(
    store: checkpoint.CheckpointStore, p: Plan, ema: Any, module: torch.nn.Module, rank: int
) -> None:
    """Resume the EMA from checkpoint `p`; ZeRO-3 partitions of another world size are re-cut."""
    from maestro.parallel.deepspeed import reshard_zero3

    saved_world = p.state["world_size"]
    if p.stage < 3 or saved_world == torch.distributed.get_world_size():
        ema.load_state_dict(checkpoint.decode(store.read(p.step, ema_name(p.stage, rank))))
        return
    parts = [checkpoint.decode(store.read(p.step, ema_name(3, r)))["shadow"] for r in range(saved_world)]
    ema.load_state_dict({"momentum": ema.momentum, "shadow": reshard_zero3(parts, module, rank)})


def restore(
    store: checkpoint.CheckpointStore, p: Plan, engine: Any, loader: Any, ema: Any, rank: int, world_size: int
) -> None:
    """Load checkpoint `p` into this rank's engine, data stream and EMA (every rank calls this)."""
    store.load(p.step, engine, rank, p.universal)
    data_states(store, p, loader, rank, world_size)
    if ema is not None:
        ema_state(store, p, ema, engine.module, rank)


def what_runs(cfg: Config, url: str, world_size: int | None = None) -> dict[str, Any]:
    """What a run of `cfg` in run folder `url` trains with: ZeRO stage, precision, optimizer,
    global batch, workers (`world_size`, default the most of `run.workers`).

    For the launcher's banner, before any worker starts: a resumed run keeps its checkpoint's
    stage, so the run's newest complete checkpoint is read when there is one. The same values
    come from the engine itself in `running` (the run summary, TensorBoard, the saved config).
    """
    from maestro.parallel.deepspeed import expected_optimizer

    world = config.worker_range(cfg)[1] if world_size is None else world_size
    store = checkpoint.CheckpointStore(url, cfg.train.keep_checkpoints)
    latest = store.latest()
    stage = None if latest is None else json.loads(store.read(latest, "state.json"))["zero_stage"]
    ds = config.deepspeed_config(cfg, world, config.uses_gpu(cfg), stage)
    stage = ds["zero_optimization"]["stage"]
    return {
        "stage": stage,
        "precision": _precision(ds),
        "optimizer": expected_optimizer(stage, config.uses_gpu(cfg)),
        "global_batch": ds["train_batch_size"],
        "workers": world,
    }


def running(engine: Any, world_size: int) -> dict[str, Any]:
    """What the engine trains with (the keys of `what_runs`)."""
    from maestro.parallel.deepspeed import optimizer_name, precision

    return {
        "stage": engine.zero_optimization_stage(),
        "precision": precision(engine),
        "optimizer": optimizer_name(engine),
        "global_batch": engine.train_batch_size(),
        "workers": world_size,
    }
