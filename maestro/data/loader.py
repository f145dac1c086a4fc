"""`build_loader`: the endless, resumable batch stream of one rank, fed by data-loader workers.

Each of the `W = max(1, data.workers)` workers of a rank runs one reader of the plan (its own
shards, shuffle and per-sample generators) and batches inside the worker. torch's DataLoader
hands out batches round-robin over workers, so batch `k` comes from worker `k mod W`; the loader
records, per worker, the stream position after its last batch. Restoring rotates the workers so
that the one whose turn is next starts first, each from its recorded position: the restored
stream yields exactly the batches the uninterrupted one would have (same ranks and workers).

With other ranks or workers than the states were saved with (an elastic restart), `resume` takes
the states of every old rank, works out which samples of the epochs under way they had consumed
(`plan.consumed`), and starts the new readers there, passing over those samples: every sample of
the epoch is still seen exactly once, though not in the order of either layout.

`data.shards` may mix splits by weight (`[{path: URL, weight: W}, ...]`): each epoch draws
round(W × N) samples of a split of N, as the plan lays out (`plan.py`); the stream state names the
mix, and a stream resumes only with the same one.

Only what the job uses is read: pretraining decodes and ships model inputs only, an evaluation
(`targets=True`) adds its targets. Batches travel from the workers as one buffer each
(`arena.py`), pinned with one copy when a GPU is present. With `data.read_ahead` on S3 each worker
reads its next shard ahead in a background thread (`storage.ReadAhead`).

The stream never ends: the training loop counts steps, so ranks with unequal shares of an epoch
never wait on each other. `batch["_skipped"]` (an int, summed over this rank's workers) and
`batch["_epoch"]` travel with every batch, so reading them costs no device synchronization.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from maestro import storage
from maestro.config import Config
from maestro.data.arena import Arena, forget, unpack
from maestro.data.plan import Plan, consumed, load_shards, merge, pack_excluded, unpack_excluded
from maestro.data.prepare import Recipe
from maestro.data.stream import Batching, ReaderStream
from maestro.errors import ConfigError, DataError

STATE_VERSION = 3  # 3: exclusions per shard (per draw with weights), for this rank's shards only


class _ShardOrder:
    """For `storage.ReadAhead`: the shard a reader opens after `url`, from the plan's read order
    (this epoch's, then the next's). Only shards the reader reads whole are named: a strided part
    (fewer shards than readers) is read by seeking, and reading it whole would waste bandwidth."""

    def __init__(self, plan: Plan, worker: int, epoch: int):
        self.plan, self.worker, self.epoch, self.i = plan, worker, epoch, 0
        self.units = [self._units(epoch), self._units(epoch + 1)]  # this epoch's and the next's

    def _units(self, epoch: int) -> list[tuple[str, bool]]:
        units = self.plan.epoch_order(epoch, self.worker).units
        return [(self.plan.shards[u.shard].url, u.stride == 1 and u.take < 0) for u in units]

    def __call__(self, url: str) -> str | None:
        now = [u for u, _ in self.units[0][self.i :]]
        if url not in now:
            if url not in [u for u, _ in self.units[1]]:
                return None  # not in the plan's order: nothing to foresee
            self.epoch, self.i = self.epoch + 1, 0
            self.units = [self.units[1], self._units(self.epoch + 1)]
            now = [u for u, _ in self.units[0]]
        self.i += now.index(url) + 1
        following = self.units[0][self.i :] or self.units[1]
        return following[0][0] if following and following[0][1] else None


class _RankStreams(IterableDataset):
    """What each data-loader worker runs: its reader's batches from a recorded position."""

    def __init__(self, loader: Loader, rotation: int, token: str):
        self.plan, self.recipe, self.batching = loader.plan, loader.recipe, loader.batching
        self.strict, self.rotation, self.token = loader.strict, rotation, token
        self.read_ahead = loader.read_ahead
        self.positions, self.skipped = [list(p) for p in loader._positions], list(loader._skipped)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = ((0 if info is None else info.id) + self.rotation) % self.plan.workers
        arena = Arena(shared=info is not None, token=f"{self.token}/{worker}")
        opener = (
            storage.ReadAhead(_ShardOrder(self.plan, worker, self.positions[worker][0]))
            if self.read_ahead
            else storage.open_file
        )
        stream = ReaderStream(
            self.plan, self.recipe, self.batching, worker, self.strict, opener, self.skipped[worker], arena
        )
        return (arena.pack(batch) for batch in stream.batches(self.positions[worker]))


class Loader:
    """Batches for one rank, forever; see the module docstring."""

    def __init__(
        self, cfg: Config, rank: int = 0, world_size: int = 1, train: bool = True, targets: bool = False
    ):
        if not cfg.data.shards:
            raise ConfigError(
                "data.shards", cfg.data.shards, "the URL of a shard split (folder or s3://bucket/prefix)"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        storage.configure(**dataclasses.asdict(cfg.storage))  # before workers start: they inherit it
        # Rank 0 checks the manifests against a listing of the shards (one per split: on S3 a
        # request per 1,000 objects); the other ranks read the manifests only.
        manifest, shards = load_shards(cfg.data.shards, check=rank == 0)
        stored = set(manifest["modalities"])
        for name in cfg.derived.modalities:
            if name not in stored:
                raise ConfigError(
                    "data.inputs", name, f"modalities stored in {cfg.data.shards} ({sorted(stored)})"
                )
        self.workers = cfg.data.workers
        self.plan = Plan(
            shards,
            seed=cfg.data.seed,
            rank=rank,
            world_size=world_size,
            workers=max(1, cfg.data.workers),
            shuffle=train,
            shuffle_buffer=cfg.data.shuffle_buffer,
        )
        total = self.plan.epoch_samples
        if total < self.plan.readers:
            raise ConfigError(
                "data.workers",
                cfg.data.workers,
                f"at most {total // world_size} workers per rank: {cfg.data.shards} gives {total} samples "
                f"an epoch for {world_size} ranks",
            )
        self.recipe = Recipe.from_config(cfg, train, targets)
        self.batching = Batching(cfg.data.batch_size, cfg.data.token_budget, dict(cfg.derived.groups))
        self.strict = cfg.data.strict
        self.read_ahead = cfg.data.read_ahead and any(storage.is_s3(s.url) for s in shards)
        self.pin = torch.cuda.is_available()  # batches in pinned memory: one copy each (`arena.Parcel`)
        self.own_buffers = 0  # batches that found no free arena slot (the consumer held them all)
        self.epoch = 0
        self._batches = 0
        self._positions = [[0, 0, 0] for _ in range(self.plan.workers)]
        self._skipped = [0] * self.plan.workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        w = self.plan.workers
        rotation = self._batches % w
        token = uuid.uuid4().hex  # names this iteration's worker arenas (see arena.py)
        loader = DataLoader(
            _RankStreams(self, rotation, token),
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.pin,
            prefetch_factor=2 if self.workers else None,
        )
        try:
            for j, batch in enumerate(loader):
                worker = batch.pop("_worker")
                assert worker == (rotation + j) % w, "data-loader workers out of round-robin order"
                self.own_buffers += batch["_parcel"].slot is None
                unpack(batch)
                self._positions[worker] = list(batch.pop("_pos"))
                self._skipped[worker] = batch.pop("_worker_skipped")
                self._batches += 1
                self.epoch = batch["_epoch"]
                batch["_skipped"] = sum(self._skipped)
                yield batch
        finally:
            forget(token)

    def skipped_samples(self) -> int:
        """Samples skipped as unreadable so far by this rank (as of the last batch yielded)."""
        return sum(self._skipped)

    def _identity(self) -> dict[str, Any]:
        """What a saved state must agree with (the layout keys only for an exact resume)."""
        return {
            "version": STATE_VERSION,
            "rank": self.plan.rank,
            "world_size": self.plan.world_size,
            "workers": self.plan.workers,
            "seed": self.plan.seed,
            "shuffle_buffer": self.plan.shuffle_buffer,
            "samples": self.plan.total,
            "mix": self.plan.mix,  # None with every weight 1 (and in states from before weights)
        }

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-able dict: where each worker's stream stands after the last batch yielded."""
        return {
            **self._identity(),
            "batches": self._batches,
            "epoch": self.epoch,
            "positions": [list(p) for p in self._positions],
            "skipped": list(self._skipped),
            # Samples an earlier layout consumed in epochs still under way (elastic restarts).
            "excluded": {
                str(e): pack_excluded(x)
                for e, x in self.plan.excluded.items()
                if e >= min(p[0] for p in self._positions)
            },
        }

    def _check(self, state: dict[str, Any], keys: tuple[str, ...]) -> None:
        mine = self._identity()
        for key in keys:
            if state.get(key) != mine[key]:
                raise DataError(
                    f"data stream state: '{key}' is {state.get(key)!r} but this loader has {mine[key]!r}; "
                    "a stream resumes only over the same shards with the same seed, shuffle buffer and weights"
                    + (", ranks and workers" if key in ("rank", "world_size", "workers") else "")
                )

    @staticmethod
    def _excluded(state: dict[str, Any]) -> dict[int, dict[int, np.ndarray]]:
        return {int(e): unpack_excluded(x) for e, x in state["excluded"].items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where a stream of the same rank, ranks and workers stood."""
        self._check(
            state, ("version", "rank", "world_size", "workers", "seed", "shuffle_buffer", "samples", "mix")
        )
        self.plan = dataclasses.replace(self.plan, excluded=self._excluded(state))
        self._batches, self.epoch = int(state["batches"]), int(state["epoch"])
        self._positions = [list(map(int, p)) for p in state["positions"]]
        self._skipped = [int(s) for s in state["skipped"]]

    def resume(self, states: list[dict[str, Any]]) -> None:
        """Continue from the states of every rank of a stream (`states[r]` of rank r): exactly where
        this rank stood if the layout is this one, else re-split (see the module docstring)."""
        first = states[0]
        self._check(first, ("version", "seed", "shuffle_buffer", "samples", "mix"))
        old_layout = (first["world_size"], first["workers"])
        if old_layout == (self.plan.world_size, self.plan.workers):
            self.load_state_dict(states[self.plan.rank])
            return
        if [s["rank"] for s in states] != list(range(first["world_size"])):
            raise DataError(
                f"data stream states of ranks {[s['rank'] for s in states]} given; "
                f"re-splitting needs all {first['world_size']} ranks' states"
            )
        low = min(p[0] for st in states for p in st["positions"])  # the epoch the slowest reader is in
        high = max(p[0] for st in states for p in st["positions"])
        mine = {e: self.plan.shards_of(e) for e in range(low, high + 1)}  # only this rank's exclusions
        taken: dict[int, dict[int, np.ndarray]] = {}
        for st in states:  # each old rank holds the exclusions of the shards its readers took
            old = dataclasses.replace(
                self.plan,
                rank=st["rank"],
                world_size=st["world_size"],
                workers=st["workers"],
                excluded=self._excluded(st),
            )
            taken = merge(taken, consumed(old, [list(map(int, p)) for p in st["positions"]], low, mine))
        self.plan = dataclasses.replace(self.plan, excluded=taken)  # an epoch all consumed is passed over
        self.epoch, self._batches = low, 0
        self._positions = [[low, 0, 0] for _ in range(self.plan.workers)]
        lost = sum(sum(st["skipped"]) for st in states)  # all ranks' skipped count, kept on rank 0
        self._skipped = [lost if self.plan.rank == 0 and w == 0 else 0 for w in range(self.plan.workers)]


def build_loader(
    cfg: Config, rank: int = 0, world_size: int = 1, train: bool = True, targets: bool = False
) -> Loader:
    """The batch stream of one rank (see `Loader`): model inputs only for pretraining; `targets=True`
    (evaluation) adds each target of `cfg.derived.targets` to the batches."""
    return Loader(cfg, rank=rank, world_size=world_size, train=train, targets=targets)
