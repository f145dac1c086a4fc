"""Who reads what, in which order: shard list, split across ranks and workers, shuffle.

The manifest gives every shard's sample count, so each epoch's whole read and emission order is
computed up front, without I/O, from `(seed, epoch, rank, worker)`:

- the shard list is permuted by `(seed, epoch)` (training only), identically on every rank;
- it is dealt out to the `ranks × workers` readers (`units[g::R]`, reader `g = rank·W + worker`);
  with fewer shards than readers each shard is cut into `k = ⌈R / S⌉` strided parts (sample `i`
  belongs to part `i mod k`), so every reader has work and every sample still has one reader;
- a reader's samples, in file order, pass a shuffle buffer of `shuffle_buffer` slots; the
  buffer's emission order is simulated on indices, so a stream can resume at any emitted position.

After a change of ranks or workers mid-epoch (an elastic restart), `excluded` holds, for each
epoch still under way, the samples the previous layout had already consumed (`consumed`): the new
readers deal out that epoch as usual and pass over them, so no sample of the epoch is seen twice
or left out. Exclusions are kept per shard (sorted sample indices within it), and a rank keeps only
those of the shards its own readers take (`shards_of`): nothing a plan holds is the size of the
archive; a reader's arrays are the size of its share.
"""

from __future__ import annotations

import base64
import math
import zlib
from dataclasses import dataclass, field

import numpy as np

from maestro import storage
from maestro.errors import DataError
from shards import manifest as manifest_io


@dataclass(frozen=True)
class Shard:
    """A shard as the plan sees it: its samples are positions 0..samples-1, in file order (their
    keys and byte ranges are in the shard's index, read only by the reader of the shard)."""

    url: str
    samples: int


@dataclass(frozen=True)
class Unit:
    """The part of a shard one reader takes: samples `offset, offset + stride, ...`."""

    shard: int
    offset: int
    stride: int


@dataclass(frozen=True)
class EpochOrder:
    units: list[Unit]
    read_unit: np.ndarray  # (M,) unit index (into `units`) of the r-th sample read
    read_index: np.ndarray  # (M,) sample index within its shard
    emission: np.ndarray  # (M,) read positions in the order they leave the shuffle buffer


def buffer_order(count: int, slots: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a `slots`-slot shuffle buffer emits `count` items fed in order 0..count-1."""
    if slots <= 1 or count <= 1:
        return np.arange(count)
    u = rng.random(count)
    buf: list[int] = []
    out = np.empty(count, dtype=np.int64)
    n = 0
    for r in range(count):
        if len(buf) < slots:
            buf.append(r)
            continue
        j = int(u[r] * len(buf))
        out[n], buf[j] = buf[j], r
        n += 1
    rest = np.array(buf, dtype=np.int64)
    out[n:] = rest[rng.permutation(len(rest))]
    return out


@dataclass(frozen=True)
class Plan:
    shards: list[Shard]
    seed: int
    rank: int
    world_size: int
    workers: int  # readers per rank (data-loader workers, at least 1)
    shuffle: bool
    shuffle_buffer: int
    # epoch -> {shard: sorted indices within the shard}, for the shards this rank's readers take
    excluded: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)

    @property
    def readers(self) -> int:
        return self.world_size * self.workers

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)

    def units(self, epoch: int, worker: int) -> list[Unit]:
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        parts = max(1, math.ceil(self.readers / len(self.shards)))
        units = [Unit(int(j), o, parts) for j in order for o in range(parts)]
        return units[self.rank * self.workers + worker :: self.readers]

    def shards_of(self, epoch: int) -> set[int]:
        """The shards this rank's readers take in `epoch`."""
        return {u.shard for w in range(self.workers) for u in self.units(epoch, w)}

    def epoch_order(self, epoch: int, worker: int) -> EpochOrder:
        units = self.units(epoch, worker)
        gone = self.excluded.get(epoch, {})
        reads = []
        for u in units:
            index = np.arange(u.offset, self.shards[u.shard].samples, u.stride, dtype=np.int64)
            if u.shard in gone:
                index = index[~np.isin(index, gone[u.shard], assume_unique=True)]
            reads.append(index)
        read_unit = np.repeat(np.arange(len(units)), [len(r) for r in reads])
        read_index = np.concatenate(reads or [np.zeros(0, np.int64)])
        slots = self.shuffle_buffer if self.shuffle else 0
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 1])
        return EpochOrder(units, read_unit, read_index, buffer_order(len(read_unit), slots, rng))


def consumed(
    plan: Plan, positions: list[list[int]], low: int, shards: dict[int, set[int]] | None = None
) -> dict[int, dict[int, np.ndarray]]:
    """Samples the readers of `plan` (one rank, `positions[w] = [epoch, p, sub]` per worker) have
    consumed in each epoch from `low` on, with `plan.excluded`: {epoch: {shard: sorted indices}},
    kept only for the shards `shards[epoch]` if given (those a new rank takes).

    Reader w has consumed its whole share of epochs before its own, and the first `p` emissions of
    its own (a sample of several items counts once begun). Shares of later epochs are untouched.
    """
    high = max(e for e, _, _ in positions)
    parts: dict[int, dict[int, list[np.ndarray]]] = {e: {} for e in range(low, high + 1)}
    for e in parts:
        for s, x in plan.excluded.get(e, {}).items():
            parts[e].setdefault(s, []).append(x)
    for w, (e, p, sub) in enumerate(positions):
        for epoch in range(low, e + 1):
            order = plan.epoch_order(epoch, w)
            taken = order.emission if epoch < e else order.emission[: p + (1 if sub else 0)]
            shard_of = np.array([u.shard for u in order.units], dtype=np.int64)[order.read_unit[taken]]
            index = order.read_index[taken]
            for s in np.unique(shard_of):
                parts[epoch].setdefault(int(s), []).append(index[shard_of == s])
    return {
        e: {
            s: np.unique(np.concatenate(xs)) for s, xs in by_shard.items() if shards is None or s in shards[e]
        }
        for e, by_shard in parts.items()
    }


def merge(
    a: dict[int, dict[int, np.ndarray]], b: dict[int, dict[int, np.ndarray]]
) -> dict[int, dict[int, np.ndarray]]:
    """The union of two exclusions."""
    out = {e: dict(x) for e, x in a.items()}
    for e, by_shard in b.items():
        mine = out.setdefault(e, {})
        for s, x in by_shard.items():
            mine[s] = np.union1d(mine[s], x) if s in mine else x
    return out


def pack_excluded(by_shard: dict[int, np.ndarray]) -> str:
    """One epoch's exclusions as text for a stream state: zlib'd (shard, index) pairs, base64."""
    pairs = [np.stack([np.full(len(x), s), x], 1) for s, x in sorted(by_shard.items())]
    flat = np.concatenate(pairs or [np.zeros((0, 2), np.int64)]).astype(np.int64)
    return base64.b64encode(zlib.compress(flat.tobytes())).decode()


def unpack_excluded(text: str) -> dict[int, np.ndarray]:
    """`pack_excluded`'s inverse."""
    pairs = np.frombuffer(zlib.decompress(base64.b64decode(text)), np.int64).reshape(-1, 2)
    shards, starts = np.unique(pairs[:, 0], return_index=True)
    return {int(s): x for s, x in zip(shards, np.split(pairs[:, 1], starts[1:]))}


def held_bytes(plan: Plan) -> int:
    """Bytes of the arrays a plan holds (its exclusions), for bounds in tests and benchmarks."""
    return sum(x.nbytes for by_shard in plan.excluded.values() for x in by_shard.values())


def _split_shards(url: str) -> tuple[dict, list[Shard]]:
    """One split's manifest and shards, checked against what the folder/prefix really holds."""
    manifest = manifest_io.read(url)
    listing = storage.file_sizes(url)
    listed = {s["name"] for s in manifest["shards"]}
    where = manifest_io.url_of(url)
    for s in manifest["shards"]:
        if s["name"] not in listing:
            raise DataError(
                f"{where}: shard '{s['name']}' is listed but missing; re-upload it or rewrite the split"
            )
        if listing[s["name"]] != s["bytes"]:
            raise DataError(
                f"{where}: shard '{s['name']}' is {listing[s['name']]} bytes; the manifest says {s['bytes']}. "
                f"Run `maestro shards verify {url}` and rewrite the split"
            )
    extra = sorted(n for n in listing if n.endswith(".tar") and n not in listed)
    if extra:
        raise DataError(
            f"{where}: shards {extra[:5]} are not in the manifest; the split is mixed with another one"
        )
    if not manifest["shards"]:
        raise DataError(f"{where}: lists no shards")
    return manifest, [Shard(storage.join(url, s["name"]), s["samples"]) for s in manifest["shards"]]


def load_shards(urls: str | list[str]) -> tuple[dict, list[Shard]]:
    """The manifest and shards of one split, or the shards of several (`data.shards` as a list)
    planned as one, in the order listed, with a combined manifest: the `modalities` every split
    holds, and `splits`, each split's own manifest."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    if len(set(map(storage.absolute, urls))) != len(urls):
        raise DataError(f"data.shards lists a split twice ({urls}); each sample would be seen twice an epoch")
    manifests, shards = [], []
    for url in urls:
        manifest, more = _split_shards(url)
        manifests.append(manifest)
        shards += more
    if len(manifests) == 1:
        return manifests[0], shards
    first = {k: v for k, v in manifests[0].items() if k != "shards"}
    common = {
        m: spec for m, spec in first["modalities"].items() if all(m in x["modalities"] for x in manifests)
    }
    return {
        **first,
        "modalities": common,
        "samples": sum(s.samples for s in shards),
        "splits": manifests,
    }, shards
