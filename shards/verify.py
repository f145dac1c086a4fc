"""`maestro shards verify`: re-read every shard of a split and check it against its manifest.

Checks, per shard: present, byte count, sha256, sample count and keys as listed; per sample: the
schema (shared with the loader) and shapes consistent with the modality specs and with the rest of
the split. Every problem names the shard and, where it applies, the sample.
"""

from __future__ import annotations

import hashlib
from typing import IO, Any

from maestro import storage
from maestro.errors import DataError
from shards import manifest as manifest_io
from shards.reader import iter_members
from shards.schema import decode


class _HashingReader:
    """A read-only file that hashes and counts what is read through it."""

    def __init__(self, f: IO[bytes]):
        self.f, self.bytes, self.sha = f, 0, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data


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
    first = seen.setdefault(mod, (x.shape[1:], str(x.dtype)))
    if (x.shape[1:], str(x.dtype)) != first:
        return f"'{mod}.npy' is {x.dtype}{x.shape}; other samples are {first[1]}(T, {', '.join(map(str, first[0]))})"
    return None


def _check_shard(split_url: str, entry: dict[str, Any], specs: dict, seen: dict) -> list[str]:
    name = entry["name"]
    url = storage.join(split_url, name)
    if not storage.exists(url):
        return [f"shard '{name}': missing (listed in the manifest)"]
    problems, keys = [], []
    with storage.open_file(url, "rb") as raw:
        f = _HashingReader(raw)
        try:
            for key, members in iter_members(f, f"shard '{name}'"):
                keys.append(key)
                try:
                    sample = decode(key, members, f"shard '{name}' ")
                except DataError as e:
                    problems.append(str(e))
                    continue
                for mod, x in sample.arrays.items():
                    p = _shape_problem(mod, x, specs, seen)
                    if p:
                        problems.append(f"shard '{name}' sample '{key}': {p}")
        except DataError as e:
            problems.append(str(e))
        while f.read(1 << 20):  # hash the tar's trailing padding too
            pass
    if f.bytes != entry["bytes"]:
        problems.append(f"shard '{name}': {f.bytes} bytes; the manifest says {entry['bytes']}")
    if f.sha.hexdigest() != entry["sha256"]:
        problems.append(f"shard '{name}': sha256 {f.sha.hexdigest()[:16]}… differs from the manifest's")
    if keys != entry["keys"]:
        missing = [k for k in entry["keys"] if k not in set(keys)]
        problems.append(
            f"shard '{name}': {len(keys)} samples read, manifest lists {entry['samples']}"
            + (f"; missing e.g. '{missing[0]}'" if missing else "; keys differ")
        )
    return problems


def verify(split_url: str) -> dict[str, Any]:
    """Check a whole split; returns {ok, shards, samples, problems} (raises only if no manifest)."""
    m = manifest_io.read(split_url)
    seen: dict[str, tuple] = {}
    problems = []
    for entry in m["shards"]:
        problems += _check_shard(split_url, entry, m["modalities"], seen)
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
