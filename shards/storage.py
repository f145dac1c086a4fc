"""Where shards live: a local folder or `s3://bucket/prefix`, both reached through fsspec.

s3fs filesystems are created lazily and cached per process (s3fs is not fork-safe: a filesystem
made before a fork must not be used after it). The endpoint and credentials come from the usual
AWS_* environment (`AWS_ENDPOINT_URL` for a non-AWS endpoint such as MinIO or a moto server).
"""

from __future__ import annotations

import os
from typing import IO

import fsspec

_FS_CACHE: dict[tuple[int, str], fsspec.AbstractFileSystem] = {}


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def join(url: str, *names: str) -> str:
    """`url/name/...` for local paths and URLs alike."""
    return "/".join([url.rstrip("/"), *names])


def filesystem(url: str) -> fsspec.AbstractFileSystem:
    """The filesystem serving `url`, one per protocol and process."""
    protocol = "s3" if is_s3(url) else "file"
    key = (os.getpid(), protocol)
    if key not in _FS_CACHE:
        if protocol == "s3":
            endpoint = os.environ.get("AWS_ENDPOINT_URL")
            client = {"endpoint_url": endpoint} if endpoint else {}
            _FS_CACHE[key] = fsspec.filesystem("s3", client_kwargs=client, skip_instance_cache=True)
        else:
            _FS_CACHE[key] = fsspec.filesystem("file")
    return _FS_CACHE[key]


def _path(url: str) -> str:
    return url[len("s3://") :] if is_s3(url) else os.path.abspath(url)


def open_file(url: str, mode: str = "rb") -> IO[bytes]:
    """Open a file for binary reading or writing; local parent folders are created on write."""
    fs = filesystem(url)
    if "w" in mode and not is_s3(url):
        os.makedirs(os.path.dirname(_path(url)), exist_ok=True)
    return fs.open(_path(url), mode)


def read_bytes(url: str) -> bytes:
    with open_file(url, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    with open_file(url, "wb") as f:
        f.write(data)


def exists(url: str) -> bool:
    fs = filesystem(url)
    fs.invalidate_cache()
    return fs.exists(_path(url))


def size(url: str) -> int:
    fs = filesystem(url)
    fs.invalidate_cache()
    return int(fs.size(_path(url)))


def list_names(url: str) -> list[str]:
    """Names of the files directly under a folder/prefix (empty if it does not exist)."""
    fs = filesystem(url)
    fs.invalidate_cache()
    path = _path(url)
    if not fs.exists(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def remove(url: str) -> None:
    fs = filesystem(url)
    fs.rm(_path(url))
