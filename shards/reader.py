"""Read shards back, sample by sample: the loader's stream, verify, inspect and tests all read here.

`read_samples` seeks straight to each wanted sample by the shard's index (`shards/index.py`; built
from the tar in memory for shards without one), reads its byte range in one request, checks it
against the index's sha256, and splits it into members with the one tar parser (`shards/tar.py`).
A sample that fails any of this is yielded with its error instead of its members: the caller
skips and counts it and reads on, so one bad sample never costs the rest of its shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import IO

from maestro import storage
from maestro.errors import DataError
from shards import manifest as manifest_io
from shards.index import ShardIndex, load_index
from shards.schema import Sample, decode
from shards.tar import BACKOFF_S, RETRIES, Cursor, parse_sample

_CHUNK = 1 << 20


class HashingCursor(Cursor):
    """A cursor whose reads, taken in file order, hash and count every byte of the file."""

    def __init__(self, url: str):
        super().__init__(url, storage.open_file)
        self.hashed, self.sha = 0, hashlib.sha256()

    def read_at(self, offset: int, n: int) -> bytes:
        while self.hashed < offset:  # a gap between samples (e.g. a directory member)
            if not self._hash(self.hashed, min(_CHUNK, offset - self.hashed)):
                break
        data = super().read_at(offset, n)
        if offset == self.hashed:
            self.sha.update(data)
            self.hashed += len(data)
        return data

    def _hash(self, offset: int, n: int) -> int:
        data = super().read_at(offset, n)
        self.sha.update(data)
        self.hashed += len(data)
        return len(data)

    def finish(self) -> None:
        """Hash the rest of the file (the end-of-archive blocks, or anything after them)."""
        while self._hash(self.hashed, _CHUNK):
            pass


def _everything(key: str) -> bool:
    return True


def sample_bytes(cur: Cursor, index: ShardIndex, i: int, where: str) -> bytes:
    """The bytes of sample `i`, checked against the index's digest (DataError if they differ)."""
    offset, size, key = int(index.offsets[i]), int(index.sizes[i]), index.keys[i]
    data = cur.read_at(offset, size)
    if len(data) < size:
        raise DataError(
            f"{where} sample '{key}': truncated at byte {offset + len(data)} ({len(data)} of {size} bytes)"
        )
    if index.digests is not None and hashlib.sha256(data).hexdigest() != index.digests[i]:
        raise DataError(
            f"{where} sample '{key}': sha256 of bytes {offset}..{offset + size} differs from the index; the shard is damaged"
        )
    return data


def read_samples(
    url: str,
    want: Callable[[str], bool] = _everything,
    opener: Callable[[str], IO[bytes]] = storage.open_file,
    retries: int = RETRIES,
    backoff: float = BACKOFF_S,
    index: ShardIndex | None = None,
) -> Iterator[tuple[str, dict[str, bytes] | DataError]]:
    """`(key, {suffix: bytes})` for each wanted sample of a shard in file order, or `(key, error)`
    for one that is damaged. Raises DataError if the shard cannot be indexed and OSError once
    read retries are spent; what was yielded before is good."""
    where = f"shard '{url}'"
    with Cursor(url, opener, retries, backoff) as cur:
        if index is None:
            index = load_index(url, opener)
        for i, key in enumerate(index.keys):
            if not want(key):
                continue
            try:
                data = sample_bytes(cur, index, i, where)
                yield key, parse_sample(data, int(index.offsets[i]), key, where)
            except DataError as e:
                yield key, e


def iter_shard(url: str) -> Iterator[Sample]:
    """Every decoded sample of one shard, in order; the first damaged one raises DataError."""
    name = url.rsplit("/", 1)[-1]
    for key, members in read_samples(url):
        if isinstance(members, DataError):
            raise members
        yield decode(key, members, f"shard '{name}' ")


def iter_split(split_url: str) -> Iterator[Sample]:
    """Every sample of a complete split (one with a manifest), shard by shard."""
    m = manifest_io.read(split_url)
    for shard in m["shards"]:
        yield from iter_shard(storage.join(split_url, shard["name"]))
