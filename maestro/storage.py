"""Where shards, runs and checkpoints live: a local folder or `s3://bucket/prefix`, both through fsspec.

The one storage layer of the project: shards, the data loader, training and the launcher reach
files only through these functions, so "is it remote" and "which filesystem" are decided here.

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


def path_of(url: str) -> str:
    """The filesystem path of `url` (bucket/key for S3, an absolute path locally)."""
    return url[len("s3://") :] if is_s3(url) else os.path.abspath(url)


def absolute(url: str) -> str:
    """`url` with a local path made absolute (Ray workers and subprocesses start elsewhere)."""
    return url if is_s3(url) else os.path.abspath(url)


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """`(filesystem, path)` for `url`, as `fsspec.core.url_to_fs` but through this module's cache."""
    return filesystem(url), path_of(url)


def open_file(url: str, mode: str = "rb") -> IO[bytes]:
    """Open a file for binary reading or writing; local parent folders are created on write."""
    fs = filesystem(url)
    if "w" in mode and not is_s3(url):
        os.makedirs(os.path.dirname(path_of(url)), exist_ok=True)
    return fs.open(path_of(url), mode)


def read_bytes(url: str) -> bytes:
    with open_file(url, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    with open_file(url, "wb") as f:
        f.write(data)


def exists(url: str) -> bool:
    fs = filesystem(url)
    fs.invalidate_cache()
    return fs.exists(path_of(url))


def size(url: str) -> int:
    fs = filesystem(url)
    fs.invalidate_cache()
    return int(fs.size(path_of(url)))


def list_names(url: str) -> list[str]:
    """Names of the files directly under a folder/prefix (empty if it does not exist)."""
    fs = filesystem(url)
    fs.invalidate_cache()
    path = path_of(url)
    if not fs.exists(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def file_sizes(url: str) -> dict[str, int]:
    """`{name: bytes}` of the files directly under a folder/prefix (empty if it does not exist)."""
    fs = filesystem(url)
    fs.invalidate_cache()
    path = path_of(url)
    if not fs.exists(path):
        return {}
    return {
        p["name"].rstrip("/").rsplit("/", 1)[-1]: int(p["size"])
        for p in fs.ls(path, detail=True)
        if p.get("type") == "file"
    }


def remove(url: str) -> None:
    fs = filesystem(url)
    fs.rm(path_of(url))
