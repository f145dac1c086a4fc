"""Read shards back, sample by sample: the loader's stream, verify, inspect and tests all read here.

`read_samples` seeks straight to each wanted sample by the shard's index (`shards/index.py`; built
from the tar in memory for shards without one) and reads its members with the one tar parser
(`shards/tar.py`), each member's data in one read straight into the bytes handed on (no second
copy), every byte of the sample's range checked on the way against the index's crc32 (its sha256
for version-1 indexes; `sample_bytes`, for verify, checks the sha256).
A sample that fails any of this is yielded with its error instead of its members: the caller
skips and counts it and reads on, so one bad sample never costs the rest of its shard.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterator
from typing import IO

from maestro import storage
from maestro.errors import DataError
from shards import manifest as manifest_io
from shards.index import ShardIndex, load_index
from shards.schema import Sample, decode
from shards.tar import BACKOFF_S, RETRIES, Cursor, sample_members

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
    """The bytes of sample `i` in one read, checked against the index's sha256 and crc32 (DataError
    if either differs): what verify reads."""
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
    if index.crcs is not None and zlib.crc32(data) != index.crcs[i]:
        raise DataError(
            f"{where} sample '{key}': crc32 of bytes {offset}..{offset + size} differs from the index "
            "(its sha256 agrees: the index is wrong); rebuild it with `maestro shards index`"
        )
    return data


class _Check:
    """The digest the index holds of a sample's bytes, computed as they are read: crc32 (version-2
    indexes) or sha256 (version 1); none for an index built in memory from an old shard."""

    def __init__(self, index: ShardIndex, i: int):
        self.kind = "crc32" if index.crcs is not None else "sha256" if index.digests is not None else ""
        self.want = index.crcs[i] if index.crcs is not None else index.digests[i] if index.digests else None
        self.crc, self.sha = 0, hashlib.sha256() if self.kind == "sha256" else None

    def update(self, data: bytes) -> None:
        if self.sha is not None:
            self.sha.update(data)
        else:
            self.crc = zlib.crc32(data, self.crc)

    def matches(self) -> bool:
        return (self.sha.hexdigest() if self.sha is not None else self.crc) == self.want


def read_sample(cur: Cursor, index: ShardIndex, i: int, where: str) -> dict[str, bytes]:
    """The members of sample `i`, read through `cur` within the sample's byte range, each member's
    data in one read, every byte of the range (padding too) checked on the way against the index's
    digest. A sample whose bytes differ from it is refused for that, whatever else is wrong with
    it (DataError)."""
    offset, key = int(index.offsets[i]), index.keys[i]
    end = offset + int(index.sizes[i])
    check = _Check(index, i)
    pos = offset  # the bytes before it are checked

    def read_at(at: int, n: int) -> bytes:
        nonlocal pos
        n = max(0, min(n, end - at))
        while check.kind and pos < at:  # padding (or a directory member) passed over: checked too
            gap = cur.read_at(pos, min(_CHUNK, at - pos))
            if not gap:
                break
            check.update(gap)
            pos += len(gap)
        data = cur.read_at(at, n)
        if check.kind and at == pos:
            check.update(data)
            pos += len(data)
        return data

    def damage() -> DataError | None:
        """What is wrong with the sample's bytes as a whole: short, or not what the index holds."""
        if not check.kind:  # no digest: its last byte is there at least
            return (
                None
                if cur.read_at(end - 1, 1)
                else DataError(f"{where} sample '{key}': truncated before byte {end}")
            )
        read_at(end, 0)  # the rest of the range
        if pos == end and check.matches():
            return None
        short = f" (truncated at byte {pos})" if pos < end else ""
        return DataError(
            f"{where} sample '{key}': {check.kind} of bytes {offset}..{end} differs from the index{short}; "
            "the shard is damaged"
        )

    try:
        out = sample_members(read_at, offset, end, key, where)
    except DataError as e:
        bad = damage()
        if bad is not None:
            raise bad from e
        raise
    bad = damage()
    if bad is not None:
        raise bad
    return out


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
                yield key, read_sample(cur, index, i, where)
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
