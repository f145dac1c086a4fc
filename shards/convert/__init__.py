"""Converters from source archives to shard splits, one module per dataset layout.

A converter module exposes `PRESET` (the registry preset its samples follow; None for `folder`,
whose modalities come from a config), `required(split)` (paths under ROOT a split needs),
`splits(root)` (the split names the archive defines), `items(root, split)` (one picklable item per
sample, with a `sample_id`; `folder` also takes the modality specs) and `read(item)` (item ->
Sample, DataError naming the file on bad input). The layout each one reads is
`shards.layouts.LAYOUTS[dataset]`. `plan` checks the whole archive before anything is written;
`convert` then drives the shard writer, split by split.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

from maestro import storage
from maestro.errors import DataError
from maestro.modalities import ModalitySpec, TargetSpec, preset
from shards.layouts import LAYOUTS
from shards.writer import DEFAULT_SHARD_BYTES, ShardWriter, write_split

CONVERTERS = {name: f"shards.convert.{name}" for name in LAYOUTS}


def module(dataset: str):
    if dataset not in CONVERTERS:
        raise DataError(f"no converter for dataset {dataset!r}; choose one of {sorted(CONVERTERS)}")
    return importlib.import_module(CONVERTERS[dataset])


@dataclasses.dataclass
class Plan:
    """What a conversion will write: the checked splits and their items, before any byte is written."""

    dataset: str  # the manifest's dataset name
    root: Path
    read: Any  # item -> Sample, picklable
    modalities: dict[str, ModalitySpec]
    targets: dict[str, TargetSpec]
    items: dict[str, list[Any]]  # split -> items, in source order
    source: str


def _wrong_root(dataset: str, root: Path, what: str) -> DataError:
    return DataError(
        f"{root}: {what}; this is not a {dataset} archive. `maestro shards convert {dataset}` "
        f"expects:\n{LAYOUTS[dataset]}"
    )


def plan(dataset: str, root: str | Path, splits: list[str] | None = None, config: Any = None) -> Plan:
    """Check `root` against the converter's layout and list every split's items.

    DataError names what was looked for and quotes the expected layout when the root, a split list
    or a required folder is missing, or a split holds no sample. `config` (a Config or YAML path)
    is required by `folder` and gives its modalities.
    """
    conv = module(dataset)
    root = Path(root)
    if not root.is_dir():
        raise _wrong_root(dataset, root, "not a folder")
    if conv.PRESET is None:
        from shards.own import specs_of

        if config is None:
            raise DataError(f"`maestro shards convert {dataset}` needs --config CONFIG (its data.modalities)")
        name, modalities, targets = specs_of(config)
    else:
        p = preset(conv.PRESET)
        name, modalities, targets = conv.PRESET, p.modalities, p.targets
    try:
        available = conv.splits(root)
    except DataError as e:
        raise _wrong_root(dataset, root, str(e)) from e
    if not available:
        raise _wrong_root(dataset, root, "no split list or split folder found")
    chosen = splits or available
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise DataError(f"{root}: split(s) {unknown} not found; the archive defines {available}")
    todo = {}
    for split in chosen:
        missing = [r for r in conv.required(split) if not (root / r).exists()]
        if missing:
            raise _wrong_root(dataset, root, f"split '{split}' needs {missing}, which are missing")
        todo[split] = conv.items(root, split, modalities) if conv.PRESET is None else conv.items(root, split)
        if not todo[split]:
            raise _wrong_root(dataset, root, f"split '{split}' lists no sample")
    return Plan(name, root, conv.read, modalities, targets, todo, f"{dataset} archive at {root.resolve()}")


def writer_for(p: Plan, split_url: str, split: str, **kw: Any) -> ShardWriter:
    """A ShardWriter for one split of a plan (kw: shard_bytes, shard_samples, overwrite)."""
    return ShardWriter(
        split_url,
        dataset=p.dataset,
        split=split,
        modalities=p.modalities,
        targets=p.targets,
        source=p.source,
        **kw,
    )


def convert(
    dataset: str,
    root: str | Path,
    out_url: str,
    *,
    splits: list[str] | None = None,
    config: Any = None,
    workers: int = 1,
    skip_bad: bool = False,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    shard_samples: int | None = None,
    progress: bool = False,
    ray: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Convert the archive at `root` to `out_url/SPLIT` for each split; returns {split: manifest}.

    `ray` (a Ray address, "" for a local Ray of `workers` CPUs) writes one Ray task per shard
    (`shards.fanout`: rerun after an interruption, it writes only the missing shards); None
    writes in this process with `workers` reader processes.
    """
    p = plan(dataset, root, splits, config)
    if ray is not None:
        from shards.fanout import ray_session, write_split_ray

        with ray_session(ray, workers):  # one Ray for every split
            return {
                split: write_split_ray(
                    storage.join(out_url, split),
                    split,
                    p.read,
                    todo,
                    dataset=p.dataset,
                    modalities=p.modalities,
                    targets=p.targets,
                    source=p.source,
                    shard_bytes=shard_bytes,
                    shard_samples=shard_samples,
                    skip_bad=skip_bad,
                    overwrite=overwrite,
                    address=ray,
                    cpus=workers,
                )
                for split, todo in p.items.items()
            }
    kw = {"shard_bytes": shard_bytes, "shard_samples": shard_samples, "overwrite": overwrite}
    # Every writer first, so an existing split stops the conversion before anything is written.
    writers = {split: writer_for(p, storage.join(out_url, split), split, **kw) for split in p.items}
    return {
        split: write_split(w, p.read, p.items[split], workers=workers, skip_bad=skip_bad, progress=progress)
        for split, w in writers.items()
    }
