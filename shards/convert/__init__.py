"""Converters from source archives to shard splits, one module per dataset layout.

A converter module exposes `PRESET` (the registry preset its samples follow), `splits(root)` (the
split names the archive defines), `items(root, split)` (one picklable item per sample, with a
`sample_id`) and `read(item)` (item -> Sample, DataError naming the file on bad input).
`convert` drives one through the shard writer, split by split.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from maestro import storage
from maestro.errors import DataError
from maestro.modalities import preset
from shards.writer import DEFAULT_SHARD_BYTES, ShardWriter, write_split

CONVERTERS = {
    "treesatai_ts": "shards.convert.treesatai_ts",
    "pastis": "shards.convert.pastis",
    "flair_hub": "shards.convert.flair_hub",
    "flair2": "shards.convert.flair2",
}


def module(dataset: str):
    if dataset not in CONVERTERS:
        raise DataError(f"no converter for dataset {dataset!r}; choose one of {sorted(CONVERTERS)}")
    return importlib.import_module(CONVERTERS[dataset])


def convert(
    dataset: str,
    root: str | Path,
    out_url: str,
    *,
    splits: list[str] | None = None,
    workers: int = 1,
    skip_bad: bool = False,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    shard_samples: int | None = None,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Convert the archive at `root` to `out_url/SPLIT` for each split; returns {split: manifest}."""
    conv = module(dataset)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; expected the root of a {dataset} archive")
    available = conv.splits(root)
    chosen = splits or available
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise DataError(f"{root}: split(s) {unknown} not found; the archive defines {available}")
    p = preset(conv.PRESET)
    out = {}
    for split in chosen:
        writer = ShardWriter(
            storage.join(out_url, split),
            dataset=conv.PRESET,
            split=split,
            modalities=p.modalities,
            targets=p.targets,
            source=f"{dataset} archive at {root.resolve()}",
            shard_bytes=shard_bytes,
            shard_samples=shard_samples,
            overwrite=overwrite,
        )
        todo = conv.items(root, split)
        out[split] = write_split(
            writer, conv.read, todo, workers=workers, skip_bad=skip_bad, progress=progress
        )
    return out
