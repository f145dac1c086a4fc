"""Read shards back, sample by sample (for inspect, verify and tests; the training loader streams
shards its own way in `maestro/data`)."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import IO

from maestro import storage
from maestro.errors import DataError
from shards import manifest as manifest_io
from shards.schema import Sample, decode


def iter_members(f: IO[bytes], where: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) per sample of a tar stream; members of a key must be contiguous."""
    key, members = None, {}
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    raise DataError(f"{where}: member '{info.name}' is not a regular file")
                base = info.name.rsplit("/", 1)[-1]
                k, _, suffix = base.partition(".")
                if not suffix:
                    raise DataError(f"{where}: member '{info.name}' has no KEY.SUFFIX name")
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                if suffix in members:
                    raise DataError(f"{where}: sample '{k}' has member '{suffix}' twice")
                members[suffix] = tar.extractfile(info).read()
    except tarfile.TarError as e:
        raise DataError(f"{where}: unreadable tar after sample '{key}' ({e})") from e
    if key is not None:
        yield key, members


def iter_shard(url: str) -> Iterator[Sample]:
    """Every decoded sample of one shard, in order."""
    name = url.rsplit("/", 1)[-1]
    with storage.open_file(url, "rb") as f:
        for key, members in iter_members(f, f"shard '{name}'"):
            yield decode(key, members, f"shard '{name}' ")


def iter_split(split_url: str) -> Iterator[Sample]:
    """Every sample of a complete split (one with a manifest), shard by shard."""
    m = manifest_io.read(split_url)
    for shard in m["shards"]:
        yield from iter_shard(storage.join(split_url, shard["name"]))
