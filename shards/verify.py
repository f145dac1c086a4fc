"""`maestro shards verify`: re-read every shard of a split and check it against its manifest.

Checks, per shard: present, byte count, sha256, its index (digest as in the manifest, sample count,
keys as a version-1 manifest lists them); per sample: the bytes against the index's sha256, the
tar members, the schema and values (shared with the loader), and shapes and dtypes consistent with
the modality specs. Each shard is read once, sequentially. Every problem names the shard and,
where it applies, the sample.
"""

from __future__ import annotations

import hashlib
from typing import Any

from maestro import storage
from maestro.errors import DataError
from shards import manifest as manifest_io
from shards.index import ShardIndex, build_index, index_url, read_index
from shards.reader import HashingCursor, sample_bytes
from shards.schema import check_values, decode
from shards.tar import parse_sample


def _shape_problem(mod: str, x, specs: dict[str, Any], seen: dict[str, tuple]) -> str | None:
    spec = specs.get(mod)
    if spec is None:
        return f"modality '{mod}' is not in the manifest's modalities {sorted(specs)}"
    c = x.shape[1]
    src = spec.get("source_channels")
    if (src is None and c != len(spec["bands"])) or (src is not None and c <= max(src)):
        return f"'{mod}.npy' has {c} channels; the spec needs {len(spec['bands'])} bands {spec['bands']}"
    if spec["num_dates"] == 1 and x.shape[0] != 1:
        return f"'{mod}.npy' has {x.shape[0]} dates; single-date modality expects 1"
    first = seen.setdefault(mod, x.shape[1:])
    if x.shape[1:] != first:
        return f"'{mod}.npy' is (T, {', '.join(map(str, x.shape[1:]))}); other samples are (T, {', '.join(map(str, first))})"
    return None


def _index_of(split_url: str, entry: dict[str, Any], version: int) -> tuple[ShardIndex, list[str]]:
    """The shard's index and the problems with it (a version-1 shard's is built from the tar)."""
    name = entry["name"]
    url = storage.join(split_url, name)
    if version == 1:
        index = build_index(url, digests=False)
        if index.keys != entry["keys"]:
            missing = [k for k in entry["keys"] if k not in set(index.keys)]
            return index, [
                f"shard '{name}': {len(index)} samples in the tar, manifest lists {entry['samples']}"
                + (f"; missing e.g. '{missing[0]}'" if missing else "; keys differ")
            ]
        return index, []
    problems = []
    data = storage.read_bytes(index_url(url)) if storage.exists(index_url(url)) else None
    want = entry["index"]
    if data is None:
        raise DataError(
            f"shard '{name}': its index '{want['name']}' is missing; rebuild it with `maestro shards index SPLIT --config CONFIG --overwrite`"
        )
    if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
        problems.append(f"shard '{name}': index '{want['name']}' differs from the manifest's digest")
    index = read_index(url)
    if len(index) != entry["samples"]:
        problems.append(
            f"shard '{name}': index lists {len(index)} samples, manifest lists {entry['samples']}"
        )
    return index, problems


def _check_shard(split_url: str, entry: dict[str, Any], m: dict[str, Any], seen: dict) -> list[str]:
    name = entry["name"]
    url = storage.join(split_url, name)
    where = f"shard '{name}'"
    if not storage.exists(url):
        return [f"{where}: missing (listed in the manifest)"]
    problems = []
    with HashingCursor(url) as cur:
        try:
            index, problems = _index_of(split_url, entry, m["version"])
        except DataError as e:
            index, problems = None, [str(e)]
        for i, key in enumerate(index.keys if index else []):
            try:
                data = sample_bytes(cur, index, i, where)
                sample = decode(key, parse_sample(data, int(index.offsets[i]), key, where), f"{where} ")
                check_values(sample, m["modalities"], f"{where} ")
            except DataError as e:
                problems.append(str(e))
                continue
            for mod, x in sample.arrays.items():
                p = _shape_problem(mod, x, m["modalities"], seen)
                if p:
                    problems.append(f"{where} sample '{key}': {p}")
        cur.finish()
    if cur.hashed != entry["bytes"]:
        problems.append(f"{where}: {cur.hashed} bytes; the manifest says {entry['bytes']}")
    if cur.sha.hexdigest() != entry["sha256"]:
        problems.append(f"{where}: sha256 {cur.sha.hexdigest()[:16]}… differs from the manifest's")
    return problems


def verify(split_url: str) -> dict[str, Any]:
    """Check a whole split; returns {ok, shards, samples, problems} (raises only if no manifest)."""
    m = manifest_io.read(split_url)
    seen: dict[str, tuple] = {}
    problems = []
    for entry in m["shards"]:
        problems += _check_shard(split_url, entry, m, seen)
    listed = {e["name"] for e in m["shards"]}
    extra = [n for n in storage.list_names(split_url) if n.endswith(".tar") and n not in listed]
    problems += [f"shard '{n}': present but not in the manifest" for n in extra]
    return {
        "url": split_url,
        "ok": not problems,
        "shards": len(m["shards"]),
        "samples": manifest_io.total_samples(m),
        "problems": problems,
    }
