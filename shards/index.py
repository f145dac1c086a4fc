"""The per-shard index `NAME.index.json`: each sample's key, byte range, sha256 and crc32, in file order.

Written by the writer beside each shard (and by `maestro shards index` for existing tars), read
only when a reader starts on that shard, so the manifest and the plan hold no per-sample data.
`offset` is the byte offset of the sample's first member header, `size` the bytes from there to
the next sample's first header (or to the end-of-archive blocks), `sha256` and `crc32` digests of
exactly those bytes: a reader seeks straight to a sample and checks what it read against the crc32
(three times faster than sha256, and what a flipped or lost byte in storage or transfer needs;
`maestro shards verify` checks the sha256). Version 1 (no crc32: the reader checks the sha256)
still reads.

    {"format": "maestro-shard-index", "version": 2, "shard": "SPLIT-000000.tar",
     "samples": [[key, offset, size, sha256hex, crc32], ...]}
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import numpy as np

from maestro import storage
from maestro.errors import DataError
from shards.tar import Cursor, Damage, members, split_name

FORMAT = "maestro-shard-index"
VERSION = 2
_COLUMNS = {1: 4, 2: 5}  # version: values per row


@dataclass(frozen=True)
class ShardIndex:
    shard: str  # the shard's file name
    keys: list[str]
    offsets: np.ndarray  # (N,) int64
    sizes: np.ndarray  # (N,) int64
    digests: list[str] | None  # sha256 hex per sample; None for an index built without them
    end: int  # where the samples end (the end-of-archive blocks start)
    crcs: list[int] | None = None  # crc32 per sample (version 2); None: check the sha256

    def __len__(self) -> int:
        return len(self.keys)

    def to_json(self) -> bytes:
        assert self.digests is not None and self.crcs is not None, "an index is stored with its digests"
        rows = [
            [k, int(o), int(s), d, c]
            for k, o, s, d, c in zip(self.keys, self.offsets, self.sizes, self.digests, self.crcs)
        ]
        return json.dumps(
            {"format": FORMAT, "version": VERSION, "shard": self.shard, "samples": rows}
        ).encode()


def index_url(shard_url: str) -> str:
    """`.../SPLIT-000000.tar` -> `.../SPLIT-000000.index.json`."""
    return shard_url.removesuffix(".tar") + ".index.json"


def _parse(data: bytes, url: str) -> ShardIndex:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(
            f"{url}: not valid JSON ({e}); rebuild it with `maestro shards index SPLIT --config CONFIG --overwrite`"
        ) from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") not in _COLUMNS:
        raise DataError(
            f"{url}: not a {FORMAT} file of version {sorted(_COLUMNS)}; rebuild it with `maestro shards index SPLIT --config CONFIG --overwrite`"
        )
    rows, columns = doc.get("samples"), _COLUMNS[doc["version"]]
    ok = isinstance(rows, list) and all(
        isinstance(r, list)
        and len(r) == columns
        and isinstance(r[0], str)
        and all(isinstance(v, int) and v >= 0 for v in r[1:3])
        and isinstance(r[3], str)
        and (columns == 4 or (isinstance(r[4], int) and 0 <= r[4] < 2**32))
        for r in rows
    )
    if not ok or not rows:
        what = "[key, offset, size, sha256]" if columns == 4 else "[key, offset, size, sha256, crc32]"
        raise DataError(f"{url}: 'samples' must be a non-empty list of {what} rows")
    offsets = np.array([r[1] for r in rows], dtype=np.int64)
    sizes = np.array([r[2] for r in rows], dtype=np.int64)
    if np.any(offsets[1:] < offsets[:-1] + sizes[:-1]):
        raise DataError(f"{url}: sample byte ranges overlap or are out of file order")
    name = str(doc.get("shard", url.rsplit("/", 1)[-1]))
    crcs = [r[4] for r in rows] if columns == 5 else None
    return ShardIndex(
        name, [r[0] for r in rows], offsets, sizes, [r[3] for r in rows], int(offsets[-1] + sizes[-1]), crcs
    )


def read_index(shard_url: str) -> ShardIndex | None:
    """The stored index of a shard; None if it has none (a version-1 split)."""
    url = index_url(shard_url)
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        return None
    return _parse(data, url)


def build_index(
    shard_url: str, opener: Callable[[str], IO[bytes]] = storage.open_file, digests: bool = True
) -> ShardIndex:
    """The index of a shard from the tar itself (headers read, data passed over by seeking; with
    `digests`, every sample read once more to hash it). A damaged header is counted in the
    sample it interrupts, which the reader then refuses."""
    name = shard_url.rsplit("/", 1)[-1]
    keys: list[str] = []
    offsets: list[int] = []
    end = 0
    pending = None  # start of a damaged region not yet given to a sample
    with Cursor(shard_url, opener) as cur:
        for m in members(cur.read_at, f"shard '{name}'"):
            if isinstance(m, Damage):
                pending = m.start if pending is None else pending
                end = m.end
                continue
            end = m.end
            if m.directory:
                continue
            key, _ = split_name(m.name)
            if not keys or key != keys[-1]:
                keys.append(key)
                offsets.append(m.start if pending is None else pending)
            pending = None
        if not keys:
            raise DataError(f"shard '{name}': holds no sample")
        starts = np.array(offsets, dtype=np.int64)
        sizes = np.diff(np.append(starts, end))
        sha = crc = None
        if digests:
            sha, crc = [], []
            for o, s in zip(starts, sizes):
                data = cur.read_at(int(o), int(s))
                if len(data) < s:
                    raise DataError(f"shard '{name}': truncated at byte {int(o) + len(data)}")
                sha.append(hashlib.sha256(data).hexdigest())
                crc.append(zlib.crc32(data))
    return ShardIndex(name, keys, starts, sizes, sha, end, crc)


def write_index(shard_url: str, index: ShardIndex) -> bytes:
    """Store `index` beside its shard; returns the bytes written (for the manifest's digest)."""
    data = index.to_json()
    storage.write_bytes(index_url(shard_url), data)
    return data


def load_index(shard_url: str, opener: Callable[[str], IO[bytes]] = storage.open_file) -> ShardIndex:
    """The stored index, or one built from the tar in memory (without digests) for old shards."""
    return read_index(shard_url) or build_index(shard_url, opener, digests=False)
