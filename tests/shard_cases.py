"""Shard splits for the reader, verify and loader tests: small synthetic samples written by the
writer, and the ways tests turn them into old, rewritten or damaged splits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from maestro.errors import DataError
from maestro.modalities import preset
from shards import manifest, reader
from shards.index import build_index, index_url, read_index, write_index
from shards.schema import Sample
from shards.synth import SynthItem, read_item
from shards.writer import ShardWriter

LONG_KEY = "plot_" + "x" * 115  # 120 characters: the writer's tar headers need PAX for it


def samples(n: int, seed: int = 1) -> list[Sample]:
    return [read_item(SynthItem("treesatai_ts", seed, i, "train", (("aerial", 34),), 8)) for i in range(n)]


def write(root: Path | str, items: list[Sample], shard_samples: int = 3) -> str:
    p = preset("treesatai_ts")
    w = ShardWriter(
        str(root), dataset="treesatai_ts", split="train", modalities=p.modalities, targets=p.targets,
        shard_samples=shard_samples,
    )  # fmt: skip
    for s in items:
        w.add(s)
    w.close()
    return str(root)


def shard_members(split: str) -> dict[str, dict[str, bytes]]:
    """{key: {suffix: bytes}} of every sample of a split, read by maestro's reader."""
    m = manifest.read(split)
    out = {}
    for s in m["shards"]:
        for key, members in reader.read_samples(f"{split}/{s['name']}"):
            assert not isinstance(members, DataError), members
            out[key] = members
    return out


def to_v1(url: str) -> None:
    """Turn a split into what maestro wrote before indexes: manifest version 1, keys inline."""
    path = Path(url) / "manifest.json"
    m = json.loads(path.read_text())
    m["version"] = 1
    for s in m["shards"]:
        s["keys"] = read_index(f"{url}/{s['name']}").keys
        Path(index_url(f"{url}/{s['name']}")).unlink()
        del s["index"]
    path.write_text(json.dumps(m))


def refresh(url: str) -> None:
    """Make indexes and manifest agree with shards a test rewrote (a hostile but consistent split)."""
    path = Path(url) / "manifest.json"
    m = json.loads(path.read_text())
    for s in m["shards"]:
        shard = f"{url}/{s['name']}"
        data = write_index(shard, build_index(shard))
        body = Path(shard).read_bytes()
        s["bytes"], s["sha256"] = len(body), hashlib.sha256(body).hexdigest()
        s["index"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    path.write_text(json.dumps(m))


def _with(sample: Sample, **arrays) -> Sample:
    for mod, (x, d) in arrays.items():
        sample.arrays[mod], sample.dates[mod] = x, d
        sample.valid.pop(mod, None)
    return sample


def bad_values(items: list[Sample]) -> dict[str, str]:
    """Damage samples 0, 2, 3, 4 of `items` each in one way; {key: what the message must say}."""
    s2, d = items[0].arrays["s2"], items[0].dates["s2"]
    _with(items[0], s2=(s2.astype(np.float64), d))
    d2 = items[2].dates["s2"].copy()
    d2[1] = (2020, 400, 0)
    _with(items[2], s2=(items[2].arrays["s2"], d2))
    t = items[3].arrays["s2"]
    _with(items[3], s2=(t[:0], items[3].dates["s2"][:0]))
    _with(items[4], s2=(np.full_like(items[4].arrays["s2"], np.nan), items[4].dates["s2"]))
    return {
        items[0].key: "float64",
        items[2].key: "day of year",
        items[3].key: "0 dates",
        items[4].key: "NaN",
    }
