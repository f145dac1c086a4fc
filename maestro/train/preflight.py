"""Checks made on the driver before any worker starts: the shards and the run storage are reachable.

A wrong bucket, endpoint or prefix then fails in seconds with the URL, instead of in every worker
after Ray has started them.
"""

from __future__ import annotations

import uuid

from maestro import storage
from maestro.config import Config
from maestro.errors import CheckpointError, ConfigError, DataError
from maestro.train.loop import run_url


def check_shards(url: str) -> None:
    if not url:
        raise ConfigError(
            "data.shards",
            url,
            "a shard folder or s3:// URL (make one with `maestro shards synth` or `convert`)",
        )
    manifest = f"{url.rstrip('/')}/manifest.json"
    try:
        fs, path = storage.url_to_fs(manifest)
        found = fs.exists(path)
    except Exception as e:  # any transport or credential failure, named with the URL below
        raise DataError(f"cannot reach the shards at {url}: {e.__class__.__name__}: {e}") from e
    if not found:
        raise DataError(
            f"no manifest.json at {url} (data.shards): point data.shards at a split folder written by "
            "`maestro shards synth` or `maestro shards convert`"
        )


def check_storage(cfg: Config) -> None:
    """Write and delete a probe object in the run folder (catches missing buckets and read-only keys)."""
    url = run_url(cfg)
    probe = f"{url}/.probe-{uuid.uuid4().hex[:8]}"
    try:
        fs, path = storage.url_to_fs(probe)
        if "://" not in url:
            fs.makedirs(url, exist_ok=True)
        fs.pipe_file(path, b"")
        fs.rm(path)
    except Exception as e:  # any transport or credential failure, named with the URL below
        raise CheckpointError(
            f"cannot write to the run storage {url} (run.storage={cfg.run.storage!r}): "
            f"{e.__class__.__name__}: {e}"
        ) from e


def check(cfg: Config) -> None:
    check_shards(cfg.data.shards)
    check_storage(cfg)
