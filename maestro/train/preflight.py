"""Checks made on the driver before any worker starts: the shards fit the config, the run storage
is writable.

A wrong bucket, endpoint or prefix, a missing or invalid manifest, an input the shards do not
hold, rasters too small for the crops, or too few samples for the ranks and loader workers then
fail in seconds with one line naming the URL or key, instead of in every worker after Ray has
started them (and again in every restart).
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from maestro import config, storage
from maestro.config import Config
from maestro.errors import CheckpointError, ConfigError, DataError
from maestro.train.loop import run_url


def read_manifest(urls: str | list[str]) -> dict[str, Any]:
    """The manifest of the split (or the combined manifest of the splits listed in data.shards),
    checked against the shards each folder holds (`load_shards`)."""
    from maestro.data.plan import load_shards

    if not urls:
        raise ConfigError(
            "data.shards",
            urls,
            "a shard folder or s3:// URL, or a list of them (make one with `maestro shards synth` or `convert`)",
        )
    for url, _ in config.shard_sources(urls):
        where = storage.join(url, "manifest.json")
        try:
            found = storage.exists(where)
        except Exception as e:  # any transport or credential failure, named with the URL below
            raise DataError(f"cannot reach the shards at {url}: {e.__class__.__name__}: {e}") from e
        if not found:
            raise DataError(
                f"no manifest.json at {url} (data.shards): point data.shards at a split folder written by "
                "`maestro shards synth` or `maestro shards convert`"
            )
    try:
        manifest, _ = load_shards(urls)
    except (AttributeError, KeyError, TypeError) as e:  # valid JSON, but not a manifest's shape
        raise DataError(
            f"{urls} holds a manifest.json that is not a maestro manifest ({e.__class__.__name__}: {e})"
        ) from e
    return manifest


def check_inputs(cfg: Config, manifest: dict[str, Any]) -> None:
    """Every model input is stored, with the bands it needs and rasters that hold the crops."""
    stored = manifest.get("modalities") or {}
    where = f"{cfg.data.shards} (data.shards)"
    for name, spec in cfg.derived.modalities.items():
        if name not in stored:
            raise ConfigError(
                "data.inputs",
                name,
                f"modalities stored in {where}: {sorted(stored)}; drop '{name}' from data.inputs or "
                "write shards that hold it",
            )
        have = stored[name]
        channels = len(have.get("bands", []))
        need = max(spec.source_channels) + 1 if spec.source_channels else len(spec.bands)
        if channels and channels < need:
            raise ConfigError(
                f"data.modalities.{name}.bands",
                spec.bands,
                f"at most the {channels} bands stored in {where} ({have.get('bands')})",
            )
        # A stored raster covers the tile plus a margin of `shift_px` on each side; a crop takes
        # the tile's pixels at the config's resolution, from `shift_px` in.
        res = have.get("resolution_m")
        if res:
            side = round(cfg.derived.tile_m / res) + 2 * int(have.get("shift_px", 0))
            needed = round(cfg.derived.tile_m / spec.resolution_m) + spec.shift_px
            if side < needed:
                raise ConfigError(
                    f"data.modalities.{name}.resolution_m",
                    spec.resolution_m,
                    f"the {res} m of {where}: its rasters are {side} px per side, a crop at "
                    f"{spec.resolution_m} m needs {needed} px",
                )


def check_samples(cfg: Config, manifest: dict[str, Any]) -> None:
    """Every loader worker of every rank reads at least one sample."""
    total = sum(s["samples"] for s in manifest["shards"])
    ranks, workers = config.worker_range(cfg)[1], max(1, cfg.data.workers)
    if total < ranks * workers:
        most = total // ranks
        limit = f"at most {most} loader worker(s) per rank" if most else f"at most {total} rank(s)"
        fix = f"data.workers={most}" if most else f"run.workers={total}"
        raise ConfigError(
            "data.workers",
            cfg.data.workers,
            f"{limit}: {cfg.data.shards} holds {total} samples and run.workers={ranks} × "
            f"data.workers={workers} = {ranks * workers} readers each need one; use {fix}, or more samples",
        )


def check_shards(cfg: Config) -> None:
    manifest = read_manifest(cfg.data.shards)
    check_inputs(cfg, manifest)
    check_samples(cfg, manifest)


def check_storage(cfg: Config) -> None:
    """Write and delete a probe object in the run folder (catches missing buckets and read-only keys)."""
    url = run_url(cfg)
    probe = storage.join(url, f".probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_bytes(probe, b"")
        storage.remove(probe)
    except Exception as e:  # any transport or credential failure, named with the URL below
        raise CheckpointError(
            f"cannot write to the run storage {url} (run.storage={cfg.run.storage!r}): "
            f"{e.__class__.__name__}: {e}"
        ) from e


def check(cfg: Config) -> None:
    from maestro.train.resume import check_config

    storage.configure(**dataclasses.asdict(cfg.storage))  # timeouts and retries for these checks too
    check_shards(cfg)
    check_storage(cfg)
    check_config(cfg, run_url(cfg))  # a resume the checkpoint refuses stops before any worker starts
