"""Labelled data for evaluation: the training stream of a split, and finite passes over a split.

`train_stream` is the one place evaluation builds the pretraining loader (`maestro.data`), for
the labelled training split with augmentation. `passes` reads a split once, deterministically,
completely and without duplicates (the reference drops and duplicates samples at evaluation,
maestro_reference.md §7.2): sample `i` of the split (manifest order) goes to rank `i mod world`,
every deterministic crop of it is an item, and the last batch is short. Items carry the
sample's `meta.json` (`_meta`) and crop index (`_crops`) for embeddings. A sample that cannot be
read or prepared is skipped and counted (`Pass.skipped`).

Splits: `eval.train`, `eval.val`, `eval.test`, by default `data.shards` and its sibling folders
`val` and `test` (`maestro shards synth/convert` write OUT/SPLIT).
"""

from __future__ import annotations

import copy
import logging
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from maestro import storage
from maestro.config import Config
from maestro.data import Loader, build_loader
from maestro.data.collate import collate_padded
from maestro.data.prepare import Recipe, select
from maestro.errors import ConfigError, DataError
from shards import manifest as manifest_io
from shards import reader

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def split_url(cfg: Config, split: str) -> str:
    """The URL of a labelled split (see the module docstring)."""
    given = getattr(cfg.eval, split)
    if given:
        return given
    if not cfg.data.shards:
        raise ConfigError(f"eval.{split}", given, "a shard split URL (or data.shards beside it)")
    if not isinstance(cfg.data.shards, str):  # a weighted mix of splits: no one split to stand beside
        raise ConfigError(
            f"eval.{split}",
            given,
            f"a shard split URL: data.shards is a mix of splits ({cfg.data.shards}), so eval.{split} "
            "cannot be found beside it; set it",
        )
    if split == "train":
        return cfg.data.shards
    parent = cfg.data.shards.rstrip("/").rsplit("/", 1)[0]
    return storage.join(parent, split)


def on_split(cfg: Config, url: str) -> Config:
    """A copy of `cfg` reading `url` (nothing derived depends on the shards' URL)."""
    out = copy.deepcopy(cfg)
    out.data.shards = url
    return out


def train_stream(cfg: Config, rank: int, world_size: int) -> Loader:
    """The endless, augmented, labelled training stream of `eval.train` for one rank."""
    return build_loader(on_split(cfg, split_url(cfg, "train")), rank, world_size, train=True, targets=True)


class Pass:
    """One deterministic pass over a split for one rank, in batches of `batch_size` items."""

    def __init__(self, cfg: Config, url: str, rank: int = 0, world_size: int = 1, limit: int | None = None):
        self.cfg, self.url, self.rank, self.world_size, self.limit = cfg, url, rank, world_size, limit
        self.recipe = Recipe.from_config(cfg, train=False, targets=True)
        self.skipped = 0

    def samples(self, shard: int | None = None) -> Iterator[tuple[int, Any]]:
        """(shard index, decoded sample) of this rank: every shard, or only shard `shard`."""
        shards = manifest_io.read(self.url)["shards"]
        first = 0
        taken = 0
        for si, entry in enumerate(shards):
            if shard is not None and si != shard:
                first += entry["samples"]
                continue
            url = storage.join(self.url, entry["name"])
            try:
                for i, sample in enumerate(reader.iter_shard(url), first):
                    if i % self.world_size != self.rank:
                        continue
                    if self.limit is not None and taken >= self.limit:
                        return
                    taken += 1
                    yield si, sample
            except (DataError, OSError) as e:
                self.skipped += 1
                log.warning("skipping the rest of %s: %s", url, e)
            first += entry["samples"]

    def items(self, shard: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        """(shard index, model item) with `_meta` and `_crop`, every crop of every sample."""
        for si, sample in self.samples(shard):
            rng = np.random.default_rng([self.cfg.data.seed, zlib.crc32(sample.key.encode())])
            try:
                got = select(sample, self.recipe, rng, f"{self.url} sample '{sample.key}'")
            except Exception as e:  # anything a bad sample can raise, as the training stream
                self.skipped += 1
                log.warning("skipping %s sample %s: %s", self.url, sample.key, e)
                continue
            for crop, item in enumerate(got):
                item["_meta"], item["_crop"] = sample.meta, crop
                yield si, item

    def batches(self, shard: int | None = None) -> Iterator[dict[str, Any]]:
        """Collated batches of every shard (or of shard `shard` only), the last one short."""
        items: list[dict[str, Any]] = []
        size = self.cfg.data.batch_size
        for _, item in self.items(shard):
            items.append(item)
            if len(items) == size:
                yield self._collate(items)
                items = []
        if items:
            yield self._collate(items)

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_padded(items, self.recipe.specs, list(self.recipe.targets))
        batch.update(_meta=[it["_meta"] for it in items], _crops=[it["_crop"] for it in items])
        return batch
