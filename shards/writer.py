"""Write samples to WebDataset tar shards of a target size, then `manifest.json`, last.

`ShardWriter` packs encoded samples into `SPLIT-000000.tar`, `SPLIT-000001.tar`, ... under a split
URL (local folder or `s3://`), hashing every byte as it streams out (the whole shard, and each
sample for the shard's index `SPLIT-000000.index.json`, written when the shard closes), and
accumulates per-band statistics. `write_split` drives it from a list of source items read in parallel by worker
processes, with a progress bar, and handles bad samples (skipped and listed, or fatal).
A split that fails part-way keeps no manifest, so it is never taken for a complete one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from maestro import storage
from maestro.errors import DataError
from maestro.modalities import ModalitySpec, TargetSpec
from shards import manifest as manifest_io
from shards.index import ShardIndex, index_url, write_index
from shards.schema import Sample, encode
from shards.stats import BandStats, provenance
from shards.tar import check_key, end_of_archive, tar_bytes

DEFAULT_SHARD_BYTES = 256 * 2**20


class _HashingWriter:
    """A write-only file that counts and hashes what passes through it."""

    def __init__(self, f: IO[bytes]):
        self.f, self.bytes, self.sha = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.sha.update(data)
        self.bytes += len(data)
        return len(data)


def raw_band_names(spec: ModalitySpec, channels: int) -> list[str]:
    """Names of the stored (raw) channels: the registry's bands, mapped back through source_channels."""
    if spec.source_channels is None and channels == len(spec.bands):
        return list(spec.bands)
    by_source = dict(zip(spec.source_channels or range(len(spec.bands)), spec.bands))
    return [by_source.get(c, f"channel{c}") for c in range(channels)]


def sample_tar_bytes(sample: Sample) -> bytes:
    """The tar members of a sample, headers included, as they go into a shard."""
    return tar_bytes(sample.key, encode(sample))


class Statistics:
    """Per-band statistics of the samples of a split, per modality (the manifest's `statistics`)."""

    def __init__(self, modalities: dict[str, ModalitySpec]):
        self.modalities = modalities
        self.seen: dict[str, BandStats] = {}

    def add(self, sample: Sample) -> None:
        for mod, x in sample.arrays.items():
            spec = self.modalities.get(mod)
            if mod not in self.seen:
                self.seen[mod] = BandStats(x.shape[1])
            self.seen[mod].add(x, sample.valid.get(mod), spec.nodata if spec else None)

    def summary(self, samples: int) -> dict[str, Any]:
        stats = {}
        for mod, acc in self.seen.items():
            spec = self.modalities.get(mod)
            channels = len(acc.count)
            names = raw_band_names(spec, channels) if spec else [f"channel{c}" for c in range(channels)]
            stats[mod] = acc.summary(names)
        return {"provenance": provenance(samples), "modalities": stats}


@dataclasses.dataclass
class Bad:
    """A source sample that could not be read: its id and why (returned by readers under skip_bad)."""

    sample_id: str
    reason: str


class ShardWriter:
    """Samples in, tar shards and their indexes out; `close()` writes the manifest and returns it."""

    def __init__(
        self,
        split_url: str,
        *,
        dataset: str,
        split: str,
        modalities: dict[str, ModalitySpec],
        targets: dict[str, TargetSpec] | None = None,
        source: str = "",
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        shard_samples: int | None = None,
        overwrite: bool = False,
    ):
        if shard_bytes <= 0 or (shard_samples is not None and shard_samples <= 0):
            raise DataError(
                f"shard size limits must be positive; got {shard_bytes} bytes, {shard_samples} samples"
            )
        self.url, self.dataset, self.split, self.source = split_url, dataset, split, source
        self.modalities, self.targets = modalities, targets or {}
        self.shard_bytes, self.shard_samples = shard_bytes, shard_samples
        self.shards: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.statistics = Statistics(modalities)
        self.stats = self.statistics.seen  # {modality: BandStats}, as Ray conversion parts save them
        self.samples = 0
        self.bytes_written = 0
        self._out: _HashingWriter | None = None
        self._raw: IO[bytes] | None = None
        # This shard's (key, offset, size, sha256, crc32).
        self._rows: list[tuple[str, int, int, str, int]] = []
        self._seen: set[str] = set()
        self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        names = storage.list_names(self.url)
        existing = [n for n in names if n == manifest_io.MANIFEST or n.endswith((".tar", ".index.json"))]
        if existing and not overwrite:
            raise DataError(
                f"{self.url}: already holds a split ({len(existing)} files, e.g. {existing[0]}); "
                f"refusing to overwrite it. Pass --overwrite (overwrite=True) or choose another OUT"
            )
        if manifest_io.MANIFEST in existing:  # first, so a crash never leaves an old manifest on new shards
            storage.remove(manifest_io.url_of(self.url))
        for n in existing:
            if n != manifest_io.MANIFEST:
                storage.remove(storage.join(self.url, n))

    def add(self, sample: Sample) -> None:
        if sample.key in self._seen:
            raise DataError(f"{self.url}: sample key '{sample.key}' written twice; sample ids must be unique")
        check_key(sample.key, f"{self.url}: ")
        data = sample_tar_bytes(sample)
        if self._out is not None and (
            self._out.bytes + len(data) > self.shard_bytes or len(self._rows) == self.shard_samples
        ):
            self._close_shard()
        if self._out is None:
            self._open_shard()
        self._rows.append(
            (sample.key, self._out.bytes, len(data), hashlib.sha256(data).hexdigest(), zlib.crc32(data))
        )
        self._out.write(data)
        self._seen.add(sample.key)
        self.samples += 1
        self.statistics.add(sample)

    @property
    def bytes_so_far(self) -> int:
        """Bytes of the closed shards plus the open one."""
        return self.bytes_written + (self._out.bytes if self._out else 0)

    def skip(self, bad: Bad) -> None:
        self.skipped.append({"sample": bad.sample_id, "reason": bad.reason})

    def _open_shard(self) -> None:
        name = manifest_io.shard_name(self.split, len(self.shards))
        # Open across `add` calls, closed by `_close_shard` or `abort`: no context manager fits.
        self._raw = storage.open_file(storage.join(self.url, name), "wb")
        self._out = _HashingWriter(self._raw)
        self.shards.append({"name": name})

    def _close_shard(self) -> None:
        end = self._out.bytes
        self._out.write(end_of_archive(end))
        self._raw.close()
        entry = self.shards[-1]
        url = storage.join(self.url, entry["name"])
        keys, offsets, sizes, digests, crcs = (list(c) for c in zip(*self._rows))
        index = ShardIndex(entry["name"], keys, np.array(offsets), np.array(sizes), digests, end, crcs)
        data = write_index(url, index)
        entry.update(samples=len(keys), bytes=self._out.bytes, sha256=self._out.sha.hexdigest())
        entry["index"] = {
            "name": index_url(url).rsplit("/", 1)[-1],
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        self.bytes_written += self._out.bytes
        self._out, self._raw, self._rows = None, None, []

    def abort(self) -> None:
        """Close the open shard without an index or manifest: the split stays visibly incomplete."""
        if self._raw is not None:
            self._raw.close()
            self._out, self._raw = None, None

    def close(self) -> dict[str, Any]:
        if self._out is not None:
            self._close_shard()
        if self.samples == 0:
            raise DataError(
                f"{self.url}: no sample was written ({len(self.skipped)} skipped); nothing to make a split of"
            )
        manifest = manifest_io.build(
            dataset=self.dataset,
            split=self.split,
            source=self.source,
            modalities={m: s for m, s in self.modalities.items() if m in self.stats},
            targets=self.targets,
            statistics=self.statistics.summary(self.samples),
            shards=[s for s in self.shards if s.get("samples")],
            skipped=self.skipped,
        )
        manifest_io.write(self.url, manifest)
        return manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _read_guarded(args: tuple[Callable[[Any], Sample], Any, bool]) -> Sample | Bad:
    read, item, skip_bad = args
    try:
        return read(item)
    except DataError as e:
        if not skip_bad:
            raise
        return Bad(getattr(item, "sample_id", str(item)), str(e))


def _read_all(
    read: Callable[[Any], Sample], items: Iterable[Any], workers: int, skip_bad: bool
) -> Iterator[Sample | Bad]:
    jobs = ((read, item, skip_bad) for item in items)
    if workers <= 1:
        yield from map(_read_guarded, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_read_guarded, jobs, chunksize=max(1, min(16, len(items) // (4 * workers))))


def write_split(
    writer: ShardWriter,
    read: Callable[[Any], Sample],
    items: Iterable[Any],
    *,
    workers: int = 1,
    skip_bad: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Read every item with `read` (in `workers` processes, results in item order) and write them.

    `read` maps an item to a Sample, raising DataError for bad input (a module-level function, so
    it pickles, when `workers > 1`); a bad sample is named by the item's `sample_id` (else the item
    itself). With `skip_bad`, such samples are counted and listed in the manifest; without, the
    first one stops the split, which then has no manifest. With one worker, `items` is read one at
    a time (a generator stays a generator).
    """
    if workers > 1:
        items = list(items)
    total = len(items) if isinstance(items, Sized) else None
    start = time.perf_counter()
    bar = tqdm(total=total, unit="sample", desc=f"{writer.dataset}/{writer.split}", disable=not progress)
    with writer, bar:
        for got in _read_all(read, items, workers, skip_bad):
            if isinstance(got, Bad):
                writer.skip(got)
                bar.set_postfix_str(f"skipped {len(writer.skipped)}", refresh=False)
            else:
                writer.add(got)
                mb = writer.bytes_so_far / 2**20
                bar.set_postfix_str(
                    f"{mb:.1f} MB, {mb / (time.perf_counter() - start):.1f} MB/s", refresh=False
                )
            bar.update()
        return writer.close()
