"""Who reads what, in which order: shard list, mixing of splits, split across ranks and workers, shuffle.

The manifest gives every shard's sample count, so each epoch's whole read and emission order is
computed up front, without I/O, from `(seed, epoch, rank, worker)`:

- each epoch draws the shards of every split (`data.shards` entry) by its weight W: a split of N
  samples contributes round(W·N) samples, as whole copies of each of its shards (W = 2.5: every
  shard twice) and, for the rest, shards taken in an order permuted by `(seed, epoch)` until the
  rest is reached, the last one in part (a subset of its samples chosen by `(seed, epoch)`): other
  shards each epoch, whole-shard reads, nothing per sample computed. A draw is named by its key
  `copy · S + shard` (S shards in all): with every weight 1 the keys are the shard indices;
- the epoch's draws are permuted by `(seed, epoch)` (training only), identically on every rank;
- they are dealt out to the `ranks × workers` readers (`units[g::R]`, reader `g = rank·W + worker`);
  with fewer draws than readers each draw is cut into `k = ⌈R / D⌉` strided parts (its i-th
  sample belongs to part `i mod k`), so every reader has work and every sample still has one reader;
- a reader's samples, in file order, pass a shuffle buffer of `shuffle_buffer` slots; the
  buffer's emission order is simulated on indices, so a stream can resume at any emitted position.

After a change of ranks or workers mid-epoch (an elastic restart), `excluded` holds, for each
epoch still under way, the samples the previous layout had already consumed (`consumed`): the new
readers deal out that epoch as usual and pass over them, so no sample of the epoch is seen twice
or left out. Exclusions are kept per draw (sorted sample indices within its shard), and a rank keeps
only those of the draws its own readers take (`shards_of`): nothing a plan holds is the size of the
archive; a reader's arrays are the size of its share.
"""

from __future__ import annotations

import base64
import math
import zlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from maestro import storage
from maestro.config import shard_sources
from maestro.errors import DataError
from shards import manifest as manifest_io

_MIX, _SUBSET = (
    0x6D6978,
    0x737562,
)  # generator tags: the shards a split's rest takes, a partial draw's samples


@dataclass(frozen=True, slots=True)
class Shard:
    """A shard as the plan sees it: its samples are positions 0..samples-1, in file order (their
    keys and byte ranges are in the shard's index, read only by the reader of the shard)."""

    url: str
    samples: int
    source: int = 0  # the `data.shards` entry it belongs to (its shards are listed together)
    weight: float = 1.0  # that entry's weight


@dataclass(frozen=True, slots=True)
class Unit:
    """The part of a draw one reader takes: samples `offset, offset + stride, ...` of the draw's
    samples (all of its shard's, or the `take` chosen for a partial draw)."""

    shard: int
    offset: int
    stride: int
    key: int  # the draw: copy · len(shards) + shard
    take: int = -1  # a partial draw's sample count; -1: the whole shard


@dataclass(frozen=True)
class EpochOrder:
    units: list[Unit]
    read_unit: np.ndarray  # (M,) unit index (into `units`) of the r-th sample read
    read_index: np.ndarray  # (M,) sample index within its shard
    emission: np.ndarray  # (M,) read positions in the order they leave the shuffle buffer


def buffer_order(count: int, slots: int, rng: np.random.Generator, limit: int | None = None) -> np.ndarray:
    """The order in which a `slots`-slot shuffle buffer emits `count` items fed in order 0..count-1
    (with `limit`, its first `limit` emissions only, computed from the first items only).

    The buffer fills with items 0..slots-1; then item r (r >= slots) replaces the item in slot
    `⌊u_r · slots⌋`, which leaves (u uniform, drawn once); what remains at the end leaves in a random
    order. Item r's evictee is therefore the last earlier item written to the same slot (or the
    slot's first item): one sort by slot computes the whole order, without a loop per item.
    """
    limit = count if limit is None else min(limit, count)
    if slots <= 1 or count <= 1:
        return np.arange(limit)
    u = rng.random(count)
    k = min(slots, count)
    evictions = count - k if limit > count - k else limit  # the evictions to simulate
    out = np.empty(limit, dtype=np.int64)
    final = np.arange(k, dtype=np.int64)  # what each slot holds after them
    if evictions:
        t = np.arange(slots, slots + evictions, dtype=np.int64)  # the items that evict one
        j = (u[slots : slots + evictions] * slots).astype(np.int64)  # the slot each one takes
        by = np.argsort(j.astype(np.uint16) if slots <= 2**16 else j, kind="stable")  # by slot, then in time
        js, ts = j[by], t[by]
        first = np.ones(len(ts), dtype=bool)
        first[1:] = js[1:] != js[:-1]
        out[ts - slots] = np.where(first, js, np.roll(ts, 1))
        last = np.ones(len(ts), dtype=bool)
        last[:-1] = first[1:]
        final[js[last]] = ts[last]
    if limit > count - k:
        out[count - k :] = final[rng.permutation(k)][: limit - (count - k)]
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
    # epoch -> {draw key: sorted indices within its shard}, for the draws this rank's readers take
    excluded: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)

    @property
    def readers(self) -> int:
        return self.world_size * self.workers

    @property
    def total(self) -> int:
        """Samples in the shards (each once)."""
        return sum(s.samples for s in self.shards)

    @cached_property
    def _counts(self) -> np.ndarray:
        return np.array([s.samples for s in self.shards], dtype=np.int64)

    @cached_property
    def sources(self) -> list[tuple[int, int, float]]:
        """(first shard, shards, weight) of each split, in the order listed."""
        ids = np.array([s.source for s in self.shards], dtype=np.int64)
        firsts = np.flatnonzero(np.diff(ids, prepend=-1))  # where a split's run of shards starts
        assert len(np.unique(ids)) == len(firsts), "a split's shards are listed together"
        ends = np.append(firsts[1:], len(ids))
        return [(int(f), int(e - f), self.shards[f].weight) for f, e in zip(firsts, ends)]

    @property
    def mix(self) -> list[list] | None:
        """[samples, weight] of each split where any weight is not 1, else None."""
        if all(w == 1 for _, _, w in self.sources):
            return None
        return [[int(self._counts[f : f + n].sum()), w] for f, n, w in self.sources]

    @property
    def epoch_samples(self) -> int:
        """Samples an epoch draws: round(weight × samples) of each split."""
        return sum(round(w * int(self._counts[f : f + n].sum())) for f, n, w in self.sources)

    def draws(self, epoch: int) -> tuple[np.ndarray, dict[int, int]]:
        """The keys of `epoch`'s draws, sorted, and the sample count of each partial draw (at most
        one per split of fractional weight). Whole copies first, then the rest: the split's shards
        in an order permuted by `(seed, epoch)`, whole until the last, which takes what remains."""
        count = len(self.shards)
        keys, partial = [], {}
        for i, (first, n, weight) in enumerate(self.sources):
            shards = np.arange(first, first + n, dtype=np.int64)
            if weight == 1:
                keys.append(shards)
                continue
            sizes = self._counts[first : first + n]
            full, rest = divmod(round(weight * int(sizes.sum())), int(sizes.sum()))
            keys += [c * count + shards for c in range(full)]
            if rest:
                order = np.random.default_rng([self.seed, epoch, _MIX, i]).permutation(n)
                size = sizes[order]
                take = np.minimum(size, rest - (np.cumsum(size) - size))  # <= 0: not drawn
                drawn = take > 0
                keys.append(full * count + shards[order][drawn])
                if take[drawn][-1] < size[drawn][-1]:
                    partial[int(keys[-1][-1])] = int(take[drawn][-1])
        return np.sort(np.concatenate(keys)), partial

    def units(self, epoch: int, worker: int) -> list[Unit]:
        keys, partial = self.draws(epoch)
        if self.shuffle:
            keys = keys[np.random.default_rng([self.seed, epoch]).permutation(len(keys))]
        parts = max(1, math.ceil(self.readers / len(keys)))
        mine = np.arange(self.rank * self.workers + worker, len(keys) * parts, self.readers)
        n = len(self.shards)
        return [
            Unit(int(k % n), int(i % parts), parts, int(k), partial.get(int(k), -1))
            for k, i in zip(keys[mine // parts], mine)
        ]

    def shards_of(self, epoch: int) -> set[int]:
        """The draws (keys) this rank's readers take in `epoch`."""
        return {u.key for w in range(self.workers) for u in self.units(epoch, w)}

    def samples_of(self, epoch: int, unit: Unit) -> np.ndarray:
        """The sample indices (within its shard) of a unit, in file order."""
        n = self.shards[unit.shard].samples
        if unit.take < 0:
            return np.arange(unit.offset, n, unit.stride, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch, _SUBSET, unit.key])
        return np.sort(rng.choice(n, unit.take, replace=False))[unit.offset :: unit.stride]

    def epoch_order(self, epoch: int, worker: int, limit: int | None = None) -> EpochOrder:
        """A reader's epoch (with `limit`: only the first `limit` emissions, for `consumed`)."""
        units = self.units(epoch, worker)
        gone = self.excluded.get(epoch, {})
        reads = []
        for u in units:
            index = self.samples_of(epoch, u)
            if u.key in gone:
                index = index[~np.isin(index, gone[u.key], assume_unique=True)]
            reads.append(index)
        read_unit = np.repeat(np.arange(len(units)), [len(r) for r in reads])
        read_index = np.concatenate(reads or [np.zeros(0, np.int64)])
        slots = self.shuffle_buffer if self.shuffle else 0
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 1])
        return EpochOrder(units, read_unit, read_index, buffer_order(len(read_unit), slots, rng, limit))


def consumed(
    plan: Plan, positions: list[list[int]], low: int, shards: dict[int, set[int]] | None = None
) -> dict[int, dict[int, np.ndarray]]:
    """Samples the readers of `plan` (one rank, `positions[w] = [epoch, p, sub]` per worker) have
    consumed in each epoch from `low` on, with `plan.excluded`: {epoch: {draw key: sorted indices}},
    kept only for the draws `shards[epoch]` if given (those a new rank takes).

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
            order = plan.epoch_order(epoch, w, None if epoch < e else p + (1 if sub else 0))
            taken = order.emission
            key = np.array([u.key for u in order.units], dtype=np.int64)[order.read_unit[taken]]
            index = order.read_index[taken]
            if shards is not None:  # only what the new rank keeps
                keep = np.isin(key, np.fromiter(shards[epoch], np.int64, len(shards[epoch])))
                key, index = key[keep], index[keep]
            by = np.argsort(key, kind="stable")
            draws, starts = np.unique(key[by], return_index=True)
            for s, x in zip(draws.tolist(), np.split(index[by], starts[1:])):
                parts[epoch].setdefault(s, []).append(x)
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
    """One epoch's exclusions as text for a stream state: zlib'd (draw key, index) pairs, base64."""
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


def _check_listing(url: str, manifest: dict) -> None:
    """The manifest against what the folder/prefix really holds (one listing, paginated on S3)."""
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


def load_shards(shards: str | list, check: bool = True) -> tuple[dict, list[Shard]]:
    """The manifest and shards of one split, or the shards of several (`data.shards` as a list,
    each entry a URL or `{path, weight}`) planned as one, in the order listed, each shard carrying
    its split's weight, with a combined manifest: the `modalities` every split holds, `samples`
    (each once), and `splits`, each split's own manifest with its `weight`. With `check`, each
    manifest is checked against a listing of its split (the loader of rank 0 does, and preflight)."""
    sources = shard_sources(shards)
    urls = [u for u, _ in sources]
    if len(set(map(storage.absolute, urls))) != len(urls):
        raise DataError(f"data.shards lists a split twice ({urls}); each sample would be seen twice an epoch")
    manifests, out = [], []
    for i, (url, weight) in enumerate(sources):
        manifest = manifest_io.read(url)
        if not manifest["shards"]:
            raise DataError(f"{manifest_io.url_of(url)}: lists no shards")
        if check:
            _check_listing(url, manifest)
        manifests.append(manifest)
        out += [Shard(storage.join(url, s["name"]), s["samples"], i, weight) for s in manifest["shards"]]
    if isinstance(shards, str):
        return manifests[0], out
    first = {k: v for k, v in manifests[0].items() if k != "shards"}
    common = {
        m: spec for m, spec in first["modalities"].items() if all(m in x["modalities"] for x in manifests)
    }
    return {
        **first,
        "modalities": common,
        "samples": sum(s.samples for s in out),
        "shards": [s for m in manifests for s in m["shards"]],
        "splits": [{**m, "weight": w} for m, (_, w) in zip(manifests, sources)],
    }, out
