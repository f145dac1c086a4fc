"""A split written as Ray tasks, one per part, with one manifest written last from the parts.

Samples are assigned to parts by position: part k holds items `[k·n, (k+1)·n)`, n samples per shard
(`shard_samples`, or estimated from the first sample and `shard_bytes`), so the assignment depends
only on the source, never on the number of workers or the order tasks finish: the shards equal, byte
for byte, those of a one-process conversion with the same n. Each task writes its part through a
`ShardWriter` into `SPLIT/_parts/part-K/` (shards named `SPLIT-K-000000.tar`, so the names are
unique in the split) and saves the part's band statistics beside it. When every part is there, the
shards are moved up into `SPLIT/` and the split's manifest is written from the parts' manifests.

An interrupted conversion keeps the parts that finished (a part counts once its manifest is
written); rerunning the same command writes only the missing parts. `SPLIT/_parts/plan.json`
records the assignment, so a rerun with another n is refused rather than mixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from maestro import storage
from maestro.errors import DataError
from maestro.modalities import ModalitySpec, TargetSpec
from shards import manifest as manifest_io
from shards.schema import encode
from shards.stats import BandStats, provenance
from shards.writer import DEFAULT_SHARD_BYTES, Bad, ShardWriter

PARTS = "_parts"
PLAN = "plan.json"
STATS = "stats.npz"
EMPTY = "empty.json"  # a part whose every sample was skipped


@dataclasses.dataclass(frozen=True)
class Part:
    """One task: write `items` (positions `index·shard_samples`…) of a split as part `index`."""

    split_url: str
    split: str
    index: int
    items: tuple[Any, ...]
    read: Callable[[Any], Any]
    dataset: str
    modalities: dict[str, ModalitySpec]
    targets: dict[str, TargetSpec]
    source: str
    shard_samples: int
    skip_bad: bool

    @property
    def url(self) -> str:
        return storage.join(self.split_url, PARTS, f"part-{self.index:06d}")


def write_part(part: Part) -> int:
    """Write one part (a Ray task body); returns its number of samples."""
    writer = ShardWriter(
        part.url,
        dataset=part.dataset,
        split=f"{part.split}-{part.index:06d}",
        modalities=part.modalities,
        targets=part.targets,
        source=part.source,
        shard_bytes=2**62,  # the part is its shard: cut by sample count only
        shard_samples=part.shard_samples,
        overwrite=True,  # a part left half-written by an interrupted run
    )
    with writer:
        for item in part.items:
            try:
                writer.add(part.read(item))
            except DataError as e:
                if not part.skip_bad:
                    raise
                writer.skip(Bad(getattr(item, "sample_id", str(item)), str(e)))
        if writer.samples == 0:
            writer.abort()
            storage.write_bytes(storage.join(part.url, EMPTY), json.dumps(writer.skipped).encode())
            return 0
        buf = io.BytesIO()
        arrays = {f"{m}/{k}": v for m, acc in writer.stats.items() for k, v in acc.arrays().items()}
        np.savez(buf, **arrays)
        storage.write_bytes(storage.join(part.url, STATS), buf.getvalue())  # before the part's manifest
        writer.close()
    return writer.samples


def samples_per_shard(read: Callable[[Any], Any], items: list[Any], shard_bytes: int) -> int:
    """n from the size of the first readable sample: shards of about `shard_bytes`."""
    for item in items[:10]:
        try:
            size = sum(512 + len(b) for b in encode(read(item)).values())
        except DataError:
            continue
        return max(1, shard_bytes // size)
    raise DataError(f"none of the first {min(10, len(items))} samples could be read; pass --shard-samples N")


def _done(part_url: str) -> bool:
    names = storage.list_names(part_url)
    return manifest_io.MANIFEST in names or EMPTY in names


def _check_plan(split_url: str, record: dict[str, Any], overwrite: bool) -> None:
    """Start a new conversion (refusing to mix with an existing split), or resume one made with the
    same assignment."""
    plan_url = storage.join(split_url, PARTS, PLAN)
    here = [n for n in storage.list_names(split_url) if n != PARTS]
    if overwrite:
        if manifest_io.MANIFEST in here:  # first, so a crash never leaves an old manifest on new shards
            storage.remove(manifest_io.url_of(split_url))
        for name in here:
            if name != manifest_io.MANIFEST:
                storage.remove(storage.join(split_url, name))
        _remove_tree(storage.join(split_url, PARTS))
    elif storage.exists(plan_url) and manifest_io.MANIFEST not in here:
        before = json.loads(storage.read_bytes(plan_url))
        if before != record:
            raise DataError(
                f"{plan_url}: an interrupted conversion with another assignment ({before}) is here; "
                f"rerun it with the same options ({record} now) or pass --overwrite"
            )
        return  # resume: the parts that finished are kept
    elif here:
        raise DataError(
            f"{split_url}: already holds a split ({len(here)} files, e.g. {here[0]}); refusing to "
            f"overwrite it. Pass --overwrite (overwrite=True) or choose another OUT"
        )
    storage.write_bytes(plan_url, json.dumps(record).encode())


def _merge(split_url: str, split: str, parts: list[Part]) -> dict[str, Any]:
    """Move every part's files into the split and write its manifest from the parts' (last)."""
    manifests, skipped, stats = [], [], {}
    for part in parts:
        names = storage.list_names(part.url)
        if EMPTY in names:
            skipped += json.loads(storage.read_bytes(storage.join(part.url, EMPTY)))
            continue
        m = json.loads(storage.read_bytes(manifest_io.url_of(part.url)))
        manifests.append(m)
        skipped += m["skipped"]
        with np.load(io.BytesIO(storage.read_bytes(storage.join(part.url, STATS))), allow_pickle=False) as z:
            for mod in {k.split("/")[0] for k in z.files}:
                acc = BandStats.from_arrays(
                    {k.split("/")[1]: z[k] for k in z.files if k.startswith(mod + "/")}
                )
                if mod in stats:
                    stats[mod].merge(acc)
                else:
                    stats[mod] = acc
        for name in names:
            if name not in (manifest_io.MANIFEST, STATS):  # shards and whatever the writer puts beside them
                _move(storage.join(part.url, name), storage.join(split_url, name))
    if not manifests:
        raise DataError(
            f"{split_url}: no sample was written ({len(skipped)} skipped); nothing to make a split of"
        )
    merged = dict(manifests[0])
    specs, bands = {}, {}
    for m in manifests:
        specs.update(m["modalities"])
        for mod, per_band in m["statistics"]["modalities"].items():
            bands.setdefault(mod, list(per_band))  # the band names the writer gave
    summaries = {mod: acc.summary(bands[mod]) for mod, acc in stats.items()}
    samples = sum(m["samples"] for m in manifests)
    merged.update(
        split=split,
        samples=samples,
        bytes=sum(m["bytes"] for m in manifests),
        modalities=specs,
        statistics={"provenance": provenance(samples), "modalities": summaries},
        shards=[s for m in manifests for s in m["shards"]],
        skipped=skipped,
    )
    manifest_io.write(split_url, merged)
    _remove_tree(storage.join(split_url, PARTS))
    return merged


def _move(src_url: str, dst_url: str) -> None:
    """A rename where the store has one (local), a server-side copy then delete on S3."""
    fs, src = storage.url_to_fs(src_url)
    fs.mv(src, storage.url_to_fs(dst_url)[1])


def _remove_tree(url: str) -> None:
    if storage.exists(url):
        fs, path = storage.url_to_fs(url)
        fs.rm(path, recursive=True)


def write_split_ray(
    split_url: str,
    split: str,
    read: Callable[[Any], Any],
    items: list[Any],
    *,
    dataset: str,
    modalities: dict[str, ModalitySpec],
    targets: dict[str, TargetSpec] | None = None,
    source: str = "",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    shard_samples: int | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    address: str = "",
    cpus: int = 2,
) -> dict[str, Any]:
    """Write `items` to `split_url` as Ray tasks (one per shard); returns the split's manifest.

    `address` is a Ray cluster address ("" starts a local Ray of `cpus` CPUs when none is running).
    """
    import ray

    if not items:
        raise DataError(f"{split_url}: no item to write")
    n = shard_samples or samples_per_shard(read, items, shard_bytes)
    _check_plan(split_url, {"items": len(items), "shard_samples": n, "dataset": dataset}, overwrite)
    parts = [
        Part(
            split_url,
            split,
            k,
            tuple(items[k * n : (k + 1) * n]),
            read,
            dataset,
            modalities,
            targets or {},
            source,
            n,
            skip_bad,
        )
        for k in range(math.ceil(len(items) / n))
    ]
    todo = [p for p in parts if not _done(p.url)]
    failed = []
    if todo:  # a rerun after every part finished (an interrupted merge) needs no Ray
        with ray_session(address, cpus):
            task = ray.remote(num_cpus=1, max_retries=0)(write_part)
            refs = [task.remote(p) for p in todo]
            for ref in refs:  # every part runs to its end, so a rerun redoes only the failed ones
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    failed.append(e)
    if failed:
        cause = failed[0].cause
        if isinstance(cause, DataError):  # bad input: the converter's own message, not a traceback
            raise DataError(f"{cause} ({len(failed)} of {len(todo)} parts failed; rerun to retry them)")
        raise failed[0]
    return _merge(split_url, split, parts)


@contextlib.contextmanager
def ray_session(address: str, cpus: int) -> Iterator[None]:
    """Ray for the block: the one already running, the cluster at `address`, or a local Ray of
    `cpus` CPUs bound to 127.0.0.1 (stopped again at the end of the block)."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address)
    else:
        from maestro import local_ray

        local_ray.start(cpus, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
