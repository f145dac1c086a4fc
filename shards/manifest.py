"""`manifest.json` of a shard split: what a split holds, written last so its presence marks completion.

A manifest records the format and version, dataset and split, the modality specs used (registry
entries as dicts), per-band statistics with their provenance, one entry per shard and the samples
skipped as bad, with the reason. Version 2 keeps per shard only what a plan needs (name, samples,
bytes, sha256) and its index file's name, bytes and sha256; sample keys live in the per-shard
index (`shards/index.py`). Version 1 (keys inline, no index) still reads, into the same shape.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from maestro import storage
from maestro.errors import DataError
from maestro.modalities import ModalitySpec, TargetSpec
from shards.schema import FORMAT

MANIFEST = "manifest.json"
VERSION = 2
_SHARD_FIELDS = {"name": str, "samples": int, "bytes": int, "sha256": str}
_BY_VERSION = {1: {"keys": list}, 2: {"index": dict}}
_INDEX_FIELDS = {"name": str, "bytes": int, "sha256": str}


def url_of(split_url: str) -> str:
    return storage.join(split_url, MANIFEST)


def shard_name(split: str, index: int) -> str:
    """`NAME-000000.tar`, NAME being the split name."""
    return f"{split}-{index:06d}.tar"


def build(
    *,
    dataset: str,
    split: str,
    source: str,
    modalities: dict[str, ModalitySpec],
    targets: dict[str, TargetSpec],
    statistics: dict[str, Any],
    shards: list[dict[str, Any]],
    skipped: list[dict[str, str]],
) -> dict[str, Any]:
    """A version-2 manifest of shard entries `{name, samples, bytes, sha256, index}`."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "dataset": dataset,
        "split": split,
        "source": source,
        "samples": sum(s["samples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "modalities": {m: dataclasses.asdict(s) for m, s in modalities.items()},
        "targets": {t: dataclasses.asdict(s) for t, s in targets.items()},
        "statistics": statistics,
        "shards": shards,
        "skipped": skipped,
    }


def write(split_url: str, manifest: dict[str, Any]) -> None:
    validate(manifest, url_of(split_url))
    storage.write_bytes(url_of(split_url), json.dumps(manifest, indent=1).encode())


def read(split_url: str) -> dict[str, Any]:
    """Load and validate a split's manifest; DataError names the file and what is wrong."""
    url = url_of(split_url)
    if not storage.exists(url):
        raise DataError(
            f"{url}: no manifest; the split is missing or incomplete (a manifest is written last). "
            f"Write it with `maestro shards synth`, `maestro shards convert` or `maestro shards index`"
        )
    try:
        manifest = json.loads(storage.read_bytes(url))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{url}: not valid JSON ({e})") from e
    validate(manifest, url)
    return manifest


def _check_fields(entry: Any, fields: dict[str, type], where: str) -> None:
    for key, typ in fields.items():
        value = entry.get(key)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise DataError(f"{where}.{key} is {value!r}; expected a {typ.__name__}")


def validate(manifest: Any, where: str) -> None:
    if not isinstance(manifest, dict):
        raise DataError(
            f"{where}: is a JSON {type(manifest).__name__}; expected an object (a maestro manifest)"
        )
    if manifest.get("format") != FORMAT:
        raise DataError(f"{where}: 'format' is {manifest.get('format')!r}; expected {FORMAT!r}")
    version = manifest.get("version")
    if version not in _BY_VERSION:
        raise DataError(
            f"{where}: 'version' is {version!r}; this maestro reads versions {sorted(_BY_VERSION)}"
        )
    for key, typ in (
        ("dataset", str),
        ("split", str),
        ("modalities", dict),
        ("statistics", dict),
        ("shards", list),
        ("skipped", list),
    ):
        if key not in manifest:
            raise DataError(f"{where}: key '{key}' is missing")
        if not isinstance(manifest[key], typ):
            raise DataError(
                f"{where}: '{key}' is {manifest[key]!r}; expected a JSON {'object' if typ is dict else typ.__name__}"
            )
    for i, shard in enumerate(manifest["shards"]):
        at = f"{where}: shards[{i}]"
        if not isinstance(shard, dict):
            raise DataError(f"{at} is {shard!r}; expected an object")
        _check_fields(shard, {**_SHARD_FIELDS, **_BY_VERSION[version]}, at)
        if version == 1 and len(shard["keys"]) != shard["samples"]:
            raise DataError(
                f"{at}: shard '{shard['name']}' lists {len(shard['keys'])} keys for {shard['samples']} samples"
            )
        if version == 2:
            _check_fields(shard["index"], _INDEX_FIELDS, f"{at}.index")


def total_samples(manifest: dict[str, Any]) -> int:
    return sum(s["samples"] for s in manifest["shards"])
