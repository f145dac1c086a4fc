"""The plan at continental scale: a 10M-sample split plans and re-splits exactly, holding per-shard
exclusions for one rank's shards only (nothing the size of the archive)."""

from __future__ import annotations

import dataclasses

import numpy as np

from maestro.data.plan import Plan, Shard, consumed, held_bytes, merge


def _plan(shards: list[Shard], rank: int, ranks: int, workers: int) -> Plan:
    return Plan(shards, seed=7, rank=rank, world_size=ranks, workers=workers, shuffle=True, shuffle_buffer=64)


def _resplit(shards, old_ranks, old_workers, positions, rank, ranks, workers) -> Plan:
    """What `Loader.resume` does: the new rank keeps what every old rank consumed, on its own shards."""
    new = _plan(shards, rank, ranks, workers)
    mine = {0: new.shards_of(0)}
    taken: dict = {}
    for r in range(old_ranks):
        taken = merge(taken, consumed(_plan(shards, r, old_ranks, old_workers), positions(r), 0, mine))
    return dataclasses.replace(new, excluded=taken)


def _ids(plan: Plan, worker: int, start: int = 0) -> np.ndarray:
    order = plan.epoch_order(0, worker)
    shard = np.array([u.shard for u in order.units], dtype=np.int64)[order.read_unit]
    first = np.cumsum([0, *(s.samples for s in plan.shards)])
    return (first[shard] + order.read_index)[order.emission[start:]]


def test_resplit_mid_epoch_sees_each_sample_once_brute_force():
    """Small scale, every reader of both layouts: old consumed + new reads = the epoch, once each."""
    shards = [Shard(f"s{i}", 37 + i % 5) for i in range(23)]
    total = sum(s.samples for s in shards)
    stop = {r: [[0, 5 + 3 * r + w, 0] for w in range(2)] for r in range(3)}
    seen = np.concatenate(
        [_ids(_plan(shards, r, 3, 2), w)[: stop[r][w][1]] for r in range(3) for w in range(2)]
    )
    after = np.concatenate(
        [_ids(_resplit(shards, 3, 2, stop.__getitem__, r, 2, 3), w) for r in range(2) for w in range(3)]
    )
    both = np.concatenate([seen, after])
    assert len(both) == total and len(np.unique(both)) == total


def test_ten_million_samples_plan_and_resplit_exactly_with_bounded_memory():
    shards = [Shard(f"s{i}", 1000) for i in range(10_000)]  # 10M samples
    old_ranks, old_workers = 64, 8
    stop = lambda r: [[0, 1000 + 10 * w + r, 1 if w == 3 else 0] for w in range(old_workers)]  # noqa: E731
    new = _resplit(shards, old_ranks, old_workers, stop, rank=3, ranks=32, workers=4)
    # What the new rank holds: exclusions of its own ~1/32 of the shards, not of the archive.
    excluded = new.excluded[0]
    assert set(excluded) <= new.shards_of(0)
    expected = sum(1000 + 10 * w + r + (w == 3) for r in range(old_ranks) for w in range(old_workers))
    held = sum(len(x) for x in excluded.values())
    assert 0 < held < expected / 8  # about 1/32 of what was consumed
    assert held_bytes(new) < 2_000_000  # a (10M,) bool per epoch alone would be 10 MB
    # Exact: the samples of the new rank's shards consumed by the old layout are exactly excluded.
    old_taken = {}
    for r in range(old_ranks):
        for w, (_, p, sub) in enumerate(stop(r)):
            old_taken.setdefault(r, []).append(_ids(_plan(shards, r, old_ranks, old_workers), w)[: p + sub])
    consumed_ids = np.concatenate([x for xs in old_taken.values() for x in xs])
    assert len(np.unique(consumed_ids)) == expected
    mine = np.array(sorted(new.shards_of(0)))
    on_mine = consumed_ids[np.isin(consumed_ids // 1000, mine)]
    ex = np.concatenate([s * 1000 + x for s, x in excluded.items()])
    np.testing.assert_array_equal(np.sort(on_mine), np.sort(ex))
    reads = np.concatenate([_ids(new, w) for w in range(4)])
    assert len(reads) == len(mine) * 1000 - len(ex)
    assert not np.isin(reads, ex).any()
