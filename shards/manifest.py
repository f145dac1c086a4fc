"""`manifest.json` of a shard split: what a split holds, written last so its presence marks completion.

A manifest records the format and version, dataset and split, the modality specs used (registry
entries as dicts), per-band statistics with their provenance, one entry per shard (name, samples,
bytes, sha256, sample keys) and the samples skipped as bad, with the reason.
"""

from __future__ import annotations

import json
from typing import Any

from maestro import storage
from maestro.errors import DataError
from shards.schema import FORMAT, VERSION

MANIFEST = "manifest.json"
_SHARD_FIELDS = {"name": str, "samples": int, "bytes": int, "sha256": str, "keys": list}


def url_of(split_url: str) -> str:
    return storage.join(split_url, MANIFEST)


def shard_name(split: str, index: int) -> str:
    """`NAME-000000.tar`, NAME being the split name."""
    return f"{split}-{index:06d}.tar"


def write(split_url: str, manifest: dict[str, Any]) -> None:
    validate(manifest, url_of(split_url))
    storage.write_bytes(url_of(split_url), json.dumps(manifest, indent=1).encode())


def read(split_url: str) -> dict[str, Any]:
    """Load and validate a split's manifest; DataError names the file and what is wrong."""
    url = url_of(split_url)
    if not storage.exists(url):
        raise DataError(
            f"{url}: no manifest; the split is missing or incomplete (a manifest is written last). "
            f"Write it with `maestro shards synth` or `maestro shards convert`"
        )
    try:
        manifest = json.loads(storage.read_bytes(url))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{url}: not valid JSON ({e})") from e
    validate(manifest, url)
    return manifest


def validate(manifest: dict[str, Any], where: str) -> None:
    if manifest.get("format") != FORMAT:
        raise DataError(f"{where}: 'format' is {manifest.get('format')!r}; expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise DataError(
            f"{where}: 'version' is {manifest.get('version')!r}; this maestro reads version {VERSION}"
        )
    for key in ("dataset", "split", "modalities", "statistics", "shards", "skipped"):
        if key not in manifest:
            raise DataError(f"{where}: key '{key}' is missing")
    for i, shard in enumerate(manifest["shards"]):
        for key, typ in _SHARD_FIELDS.items():
            if not isinstance(shard.get(key), typ):
                raise DataError(
                    f"{where}: shards[{i}].{key} is {shard.get(key)!r}; expected a {typ.__name__}"
                )
        if len(shard["keys"]) != shard["samples"]:
            raise DataError(
                f"{where}: shard '{shard['name']}' lists {len(shard['keys'])} keys for {shard['samples']} samples"
            )


def total_samples(manifest: dict[str, Any]) -> int:
    return sum(s["samples"] for s in manifest["shards"])
