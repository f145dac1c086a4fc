"""One reader's endless stream: epoch after epoch, samples in the plan's order, batched.

A position `[epoch, p, sub]` means "next comes item `sub` of the `p`-th sample to leave the
shuffle buffer in `epoch`". Reading resumes there exactly: samples emitted before `p` are skipped
unread (the shard's index gives each sample's byte range: the reader seeks straight to the ones
it wants), the ones still in the buffer at `p` are read again. Samples are decoded only when they
leave the buffer. A sample that cannot be read, fails its digest, is damaged, decodes badly, holds
bad values (`shards.schema.check_values`) or cannot be prepared (after retries for transient read
errors) is skipped and counted, and the log names its shard and key; with `strict` the error is
raised instead.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from maestro.data.arena import Arena
from maestro.data.collate import collate_packed, collate_padded, item_tokens
from maestro.data.plan import EpochOrder, Plan
from maestro.data.prepare import Recipe, needed, select
from maestro.errors import DataError
from maestro.modalities import ModalitySpec
from shards.index import ShardIndex, load_index
from shards.reader import read_samples
from shards.schema import check_values, decode

log = logging.getLogger(__name__)


@dataclass
class _Failed:
    reason: str


@dataclass(frozen=True)
class Batching:
    batch_size: int
    token_budget: int  # > 0: packed batches
    groups: dict[str, list[str]]


class ReaderStream:
    """Batches of one reader (rank, logical worker), from a start position, forever."""

    def __init__(
        self,
        plan: Plan,
        recipe: Recipe,
        batching: Batching,
        worker: int,
        strict: bool,
        opener: Callable[[str], IO[bytes]],
        skipped: int = 0,
        arena: Arena | None = None,
    ):
        self.plan, self.recipe, self.batching = plan, recipe, batching
        self.worker, self.strict, self.opener = worker, strict, opener
        self.skipped = skipped  # samples skipped so far by this reader (restored with its position)
        self.arena = arena  # reused batch buffers (see maestro/data/arena.py); None: fresh ones
        self._specs = {m: dataclasses.asdict(s) for m, s in recipe.specs.items()}
        self._last_index: tuple[str, ShardIndex] | None = None

    def _fail(self, where: str, e: BaseException) -> _Failed:
        if self.strict:
            raise e
        log.warning("skipping %s: %s", where, e)
        return _Failed(f"{e.__class__.__name__}: {e}")

    def _index(self, url: str) -> ShardIndex:
        """The index of the shard being read (kept: with strided parts a reader rereads its shard)."""
        if self._last_index is None or self._last_index[0] != url:
            self._last_index = (url, load_index(url, self.opener))
        return self._last_index[1]

    def _emitted(self, order: EpochOrder, start: int) -> Iterator[tuple[int, int, str, Any]]:
        """(p, read position, key, members or _Failed) for emissions p >= start, reading shards in order."""
        m = len(order.emission)
        if start >= m:
            return
        arrived = np.zeros(m, dtype=bool)
        arrived[order.emission[:start]] = True
        pending: dict[int, tuple[str, Any]] = {}
        p = start
        unit_start = np.searchsorted(order.read_unit, np.arange(len(order.units) + 1))
        first = int(order.read_unit[order.emission[start:].min()])
        for ui in range(first, len(order.units)):
            unit = order.units[ui]
            shard = self.plan.shards[unit.shard]
            r0, r1 = int(unit_start[ui]), int(unit_start[ui + 1])
            reads = [int(i) for i in order.read_index[r0:r1]]
            keys = [f"#{i}" for i in reads]  # until the index names them
            reason = "missing from its shard (listed in the manifest)"
            try:
                index = self._index(shard.url)
                if index.digests is not None and len(index) != shard.samples:
                    raise DataError(
                        f"{shard.url}: its index lists {len(index)} samples; the manifest says {shard.samples}"
                    )
                keys = [index.keys[i] if i < len(index) else f"#{i}" for i in reads]
                position = {k: r0 + n for n, k in enumerate(keys) if not arrived[r0 + n]}
                for key, members in read_samples(shard.url, position.__contains__, self.opener, index=index):
                    r = position[key]
                    arrived[r] = True
                    if isinstance(members, DataError):
                        members = self._fail(f"{shard.url} sample '{key}'", members)
                    pending[r] = (key, members)
                    while p < m and order.emission[p] in pending:
                        yield p, int(order.emission[p]), *pending.pop(int(order.emission[p]))
                        p += 1
            except (DataError, OSError) as e:
                reason = self._fail(shard.url, e).reason
            for r in range(r0, r1):
                if not arrived[r]:
                    arrived[r] = True
                    pending[r] = (keys[r - r0], _Failed(reason))
            while p < m and order.emission[p] in pending:
                yield p, int(order.emission[p]), *pending.pop(int(order.emission[p]))
                p += 1

    def items(self, start: list[int]) -> Iterator[tuple[dict[str, Any], list[int], int]]:
        """(item, position after it, samples skipped before it), forever."""
        epoch, p0, sub0 = start
        plan = self.plan
        while True:
            order = plan.epoch_order(epoch, self.worker)
            produced = False
            for p, r, key, got in self._emitted(order, p0):
                unit = order.units[int(order.read_unit[r])]
                index = int(order.read_index[r])
                shard = plan.shards[unit.shard]
                where = f"{shard.url} sample '{key}'"
                if not isinstance(got, _Failed):  # (the draw's key: each copy of a sample its own crop)
                    rng = np.random.default_rng([plan.seed, epoch, plan.rank, self.worker, unit.key, index])
                    try:
                        sample = decode(key, needed(got, self.recipe, where), f"{shard.url} ")
                        check_values(sample, self._specs, f"{shard.url} ")
                        got = select(sample, self.recipe, rng, where)
                    except Exception as e:  # anything a bad sample can raise; strict re-raises
                        got = self._fail(where, e)
                if isinstance(got, _Failed):
                    self.skipped += 1
                    if self.strict:
                        raise DataError(f"{where}: {got.reason}")
                    continue
                for sub in range(sub0 if p == p0 else 0, len(got)):
                    produced = True
                    after = [epoch, p + 1, 0] if sub + 1 == len(got) else [epoch, p, sub + 1]
                    yield got[sub], after, self.skipped
            if not produced and p0 == 0 and len(order.emission):  # (an epoch can be all excluded)
                raise DataError(
                    f"reader {plan.rank}/{self.worker}: no readable sample in epoch {epoch} "
                    f"({len(order.emission)} planned, {self.skipped} skipped so far); the shards are unusable"
                )
            epoch, p0, sub0 = epoch + 1, 0, 0

    def batches(self, start: list[int]) -> Iterator[dict[str, Any]]:
        """Collated batches with their stream metadata, forever."""
        specs: dict[str, ModalitySpec] = self.recipe.specs
        targets = list(self.recipe.targets)
        b = self.batching
        items = self.items(start)
        carry = None
        while True:
            taken, pos, skipped = [], None, 0
            if b.token_budget <= 0:
                for _ in range(b.batch_size):
                    item, pos, skipped = next(items)
                    taken.append(item)
                batch = collate_padded(taken, specs, targets, self.arena)
            else:
                used = 0
                while True:
                    item, after, skipped_before = carry if carry is not None else next(items)
                    carry = None
                    n = sum(item_tokens(item, specs).values())
                    if n > b.token_budget:
                        raise DataError(
                            f"sample '{item['_key']}' has {n} tokens, more than data.token_budget="
                            f"{b.token_budget}; raise the budget above the largest sample"
                        )
                    if used + n > b.token_budget:
                        carry = (item, after, skipped_before)
                        break
                    taken.append(item)
                    used, pos, skipped = used + n, after, skipped_before
                batch = collate_packed(taken, specs, targets, b.token_budget, self.arena)
            batch.update(_worker=self.worker, _pos=pos, _epoch=pos[0], _worker_skipped=skipped)
            yield batch
