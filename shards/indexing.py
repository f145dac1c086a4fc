"""`maestro shards index URL --config CONFIG`: make existing WebDataset tar shards a maestro split.

For tar shards written by another tool (webdataset's `TarWriter`/`ShardWriter`, `tar`, ...) with
maestro's member names (`KEY.MOD.npy`, `KEY.MOD.dates.npy`, optional `KEY.MOD.valid.npy`,
targets `KEY.NAME.npy`, `KEY.meta.json`), this writes what maestro's writer writes beside its own
shards: each shard's index `NAME.index.json` and, last, `manifest.json` (version 2) with the
config's modality specs and per-band statistics computed as the writer computes them. Each shard
is read once, sequentially, after a scan of its headers. Every sample is decoded and checked
against the config (the loader's checks); a split with bad samples is refused, naming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import zlib
from typing import Any

from maestro import storage
from maestro.config import Config
from maestro.errors import DataError
from shards import manifest as manifest_io
from shards.index import ShardIndex, build_index, index_url, write_index
from shards.reader import HashingCursor, sample_bytes
from shards.schema import check_values, decode
from shards.tar import parse_sample
from shards.writer import Statistics


def _index_shard(url: str, cfg: Config, stats: Statistics, problems: list[str]) -> dict[str, Any]:
    name = url.rsplit("/", 1)[-1]
    where = f"shard '{name}'"
    specs = {m: dataclasses.asdict(s) for m, s in cfg.derived.modalities.items()}
    scanned = build_index(url, digests=False)
    digests, crcs = [], []
    with HashingCursor(url) as cur:
        for i, key in enumerate(scanned.keys):
            data = sample_bytes(cur, scanned, i, where)
            digests.append(hashlib.sha256(data).hexdigest())
            crcs.append(zlib.crc32(data))
            try:
                sample = decode(key, parse_sample(data, int(scanned.offsets[i]), key, where), f"{where} ")
                check_values(sample, specs, f"{where} ")
            except DataError as e:
                problems.append(str(e))
                continue
            stats.add(sample)
        cur.finish()
    index = ShardIndex(name, scanned.keys, scanned.offsets, scanned.sizes, digests, scanned.end, crcs)
    data = write_index(url, index)
    return {
        "name": name,
        "samples": len(index),
        "bytes": cur.hashed,
        "sha256": cur.sha.hexdigest(),
        "index": {
            "name": index_url(url).rsplit("/", 1)[-1],
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        },
    }


def index_split(split_url: str, cfg: Config, overwrite: bool = False, source: str = "") -> dict[str, Any]:
    """Index every `.tar` under `split_url` and write its manifest; returns the manifest."""
    names = storage.list_names(split_url)
    tars = [n for n in names if n.endswith(".tar")]
    if not tars:
        raise DataError(
            f"{split_url}: holds no .tar shard; expected WebDataset tar files (e.g. train-000000.tar)"
        )
    if manifest_io.MANIFEST in names:
        if not overwrite:
            raise DataError(
                f"{split_url}: already has a manifest; pass --overwrite to index the shards again"
            )
        storage.remove(manifest_io.url_of(split_url))  # first: no old manifest over new indexes
    stats = Statistics(cfg.derived.modalities)
    problems: list[str] = []
    shards = [_index_shard(storage.join(split_url, n), cfg, stats, problems) for n in tars]
    if problems:
        raise DataError(
            f"{split_url}: {len(problems)} bad samples, e.g. {'; '.join(problems[:3])}. "
            f"Fix or remove them and index again (no manifest was written)"
        )
    unseen = sorted(set(cfg.derived.modalities) - set(stats.seen))
    if unseen:
        raise DataError(
            f"{split_url}: no sample holds {unseen} (members KEY.MOD.npy); the config's modalities are "
            f"{sorted(cfg.derived.modalities)}: set data.inputs to what the shards hold"
        )
    manifest = manifest_io.build(
        dataset=cfg.data.dataset,
        split=split_url.rstrip("/").rsplit("/", 1)[-1],
        source=source or f"indexed by `maestro shards index` from {split_url}",
        modalities={m: s for m, s in cfg.derived.modalities.items() if m in stats.seen},
        targets={t: s for t, s in cfg.derived.targets.items()},
        statistics=stats.summary(sum(s["samples"] for s in shards)),
        shards=shards,
        skipped=[],
    )
    manifest_io.write(split_url, manifest)
    return manifest


def run(args: argparse.Namespace) -> int:
    """The command: index `args.url` with the modalities of `args.config`."""
    from maestro import config
    from maestro.cli import print_json

    cfg = config.load(args.config, args.overrides)
    m = index_split(args.url, cfg, overwrite=args.overwrite)
    print(
        f"{args.url}: indexed {m['samples']} samples in {len(m['shards'])} shards ({', '.join(m['modalities'])})"
    )
    if args.json:
        print_json({"url": args.url, "samples": m["samples"], "shards": len(m["shards"])})
    return 0
