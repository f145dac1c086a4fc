"""Splits mixed by weight (`data.shards: [{path, weight}, ...]`): each epoch draws round(W × N)
samples of a split of N, in the plan (counted exactly, no I/O) and through the loader, and the
stream resumes exactly, in the same layout and across a change of ranks and workers."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from conftest import assert_stream_resumes_exactly
from shard_cases import samples, write

from maestro import config
from maestro.data import build_loader
from maestro.data.plan import Plan, Shard, buffer_order, consumed, merge, pack_excluded, unpack_excluded
from maestro.errors import ConfigError, DataError

AERIAL = {"aerial": {"resolution_m": 2.0, "image_size": 30, "patch_size": 10}}

# Four splits: 60 samples drawn 3 times, 35 of which 18 are drawn (round(17.5)), 36 drawn once,
# 24 drawn once and 12 of them once more.
SPLITS = [(6, 10, 3.0), (5, 7, 0.5), (4, 9, 1.0), (3, 8, 1.5)]  # (shards, samples per shard, weight)


def _shards() -> list[Shard]:
    out = []
    for source, (n, size, weight) in enumerate(SPLITS):
        out += [Shard(f"s{source}-{i}", size, source, weight) for i in range(n)]
    return out


def _plan(rank: int, ranks: int, workers: int, excluded=None) -> Plan:
    return Plan(_shards(), seed=5, rank=rank, world_size=ranks, workers=workers, shuffle=True,
                shuffle_buffer=8, excluded=excluded or {})  # fmt: skip


def _draws(plan: Plan, epoch: int, worker: int) -> list[tuple[int, int]]:
    """(draw key, sample index) in the order the reader emits them."""
    order = plan.epoch_order(epoch, worker)
    keys = np.array([u.key for u in order.units], dtype=np.int64)[order.read_unit]
    return list(zip(keys[order.emission].tolist(), order.read_index[order.emission].tolist()))


def _epoch(ranks: int, workers: int, epoch: int = 0) -> list[tuple[int, int]]:
    return [
        d for r in range(ranks) for w in range(workers) for d in _draws(_plan(r, ranks, workers), epoch, w)
    ]


def _per_sample(draws: list[tuple[int, int]]) -> collections.Counter:
    """How often each (shard, index) is drawn."""
    n = len(_shards())
    return collections.Counter((k % n, i) for k, i in draws)


def _source(shard: int) -> int:
    return _shards()[shard].source


def _reference_buffer(count: int, slots: int, rng: np.random.Generator) -> np.ndarray:
    """The shuffle buffer run item by item (what `buffer_order` computes in one sort)."""
    if slots <= 1 or count <= 1:
        return np.arange(count)
    u, buf, out = rng.random(count), [], []
    for r in range(count):
        if len(buf) < slots:
            buf.append(r)
            continue
        j = int(u[r] * len(buf))
        out.append(buf[j])
        buf[j] = r
    return np.array(out + [buf[i] for i in rng.permutation(len(buf))], dtype=np.int64)


@pytest.mark.parametrize(
    "count,slots", [(0, 4), (1, 4), (3, 4), (4, 4), (5, 4), (97, 7), (2000, 64), (30, 2)]
)
def test_buffer_order_is_the_buffer_run_item_by_item(count, slots):
    got = buffer_order(count, slots, np.random.default_rng([count, slots]))
    np.testing.assert_array_equal(got, _reference_buffer(count, slots, np.random.default_rng([count, slots])))
    assert sorted(got.tolist()) == list(range(count))
    for limit in {0, 1, count // 2, max(0, count - slots), count - 1, count, count + 3}:  # a prefix alone
        part = buffer_order(count, slots, np.random.default_rng([count, slots]), max(0, limit))
        np.testing.assert_array_equal(part, got[: max(0, limit)])


def test_each_epoch_draws_every_split_by_its_weight():
    by_epoch = []
    for epoch in (0, 1):
        drawn = _epoch(3, 2, epoch)
        counts = _per_sample(drawn)
        per_source = collections.Counter()
        for (shard, _), c in counts.items():
            per_source[_source(shard)] += c
        assert per_source == {0: 180, 1: 18, 2: 36, 3: 36}  # 3 × 60, round(0.5 × 35), 36, 1.5 × 24
        assert len(drawn) == len(set(drawn))  # a draw's samples once each
        assert {c for (s, _), c in counts.items() if _source(s) == 0} == {3}  # every sample thrice
        assert {c for (s, _), c in counts.items() if _source(s) in (1, 2)} == {1}
        assert len([1 for s, _ in counts if _source(s) == 2]) == 36
        assert sorted(c for (s, _), c in counts.items() if _source(s) == 3) == [1] * 12 + [2] * 12
        by_epoch.append({x for x in counts if _source(x[0]) == 1})
    assert by_epoch[0] != by_epoch[1]  # the half of split 1 changes with the epoch
    assert _epoch(3, 2, 0) == _epoch(3, 2, 0)  # a function of (seed, epoch, rank, worker)


def test_all_weights_one_is_the_plain_plan():
    plain = [Shard(s.url, s.samples) for s in _shards()]
    ones = [Shard(s.url, s.samples, s.source, 1.0) for s in _shards()]
    for w in range(2):
        a = Plan(plain, 5, 1, 3, 2, True, 8).epoch_order(0, w)
        b = Plan(ones, 5, 1, 3, 2, True, 8).epoch_order(0, w)
        assert [u.key for u in b.units] == [u.shard for u in a.units]
        np.testing.assert_array_equal(a.read_index[a.emission], b.read_index[b.emission])


def test_weighted_epoch_resumes_exactly_after_a_change_of_ranks_and_workers():
    """3 ranks × 2 workers stop mid-epoch; 2 ranks × 3 workers take the exclusions (as stored) and
    finish: together they draw exactly the uninterrupted epoch, no draw twice."""
    stop = {r: [[0, 4 + 5 * r + 3 * w, 0] for w in range(2)] for r in range(3)}
    before = [d for r in range(3) for w in range(2) for d in _draws(_plan(r, 3, 2), 0, w)[: stop[r][w][1]]]
    after = []
    for rank in range(2):
        mine = {0: _plan(rank, 2, 3).shards_of(0)}
        taken: dict = {}
        for r in range(3):
            taken = merge(taken, consumed(_plan(r, 3, 2), stop[r], 0, mine))
        stored = json.loads(json.dumps({str(e): pack_excluded(x) for e, x in taken.items()}))
        new = _plan(rank, 2, 3, {int(e): unpack_excluded(x) for e, x in stored.items()})
        after += [d for w in range(3) for d in _draws(new, 0, w)]
    assert len(before) == sum(s[1] for ws in stop.values() for s in ws)
    assert len(before) + len(after) == len(set(before + after)) == 180 + 18 + 36 + 36
    assert sorted(before + after) == sorted(_epoch(3, 2, 0))


def _cfg(shards, **data) -> config.Config:
    base = {"shards": shards, "batch_size": 1, "workers": 0, "shuffle_buffer": 3, "modalities": AERIAL}
    return config.from_dict({"data": {**base, **data}})


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Split a (4 samples, weight 2: 8 an epoch) and split b (6, weight 0.5: 3 an epoch)."""
    root = tmp_path_factory.mktemp("mix")
    a = write(root / "a", samples(4, seed=1), shard_samples=2)
    b = write(root / "b", samples(6, seed=2), shard_samples=2)
    keys_a, keys_b = {s.key for s in samples(4, seed=1)}, {s.key for s in samples(6, seed=2)}
    assert not keys_a & keys_b
    return [{"path": a, "weight": 2}, {"path": b, "weight": 0.5}], keys_a, keys_b


def _epoch_keys(loaders, epoch: int = 0, n: int = 40) -> list[str]:
    out = []
    for loader in loaders:
        it = iter(loader)
        for _ in range(n):
            batch = next(it)
            if batch["_epoch"] > epoch:
                break
            out += batch["_keys"] if batch["_epoch"] == epoch else []
    return out


def test_loader_streams_weighted_splits_in_proportion_and_resumes_exactly(mixed):
    shards, keys_a, keys_b = mixed
    cfg = _cfg(shards)
    for epoch in (0, 1):
        counts = collections.Counter(_epoch_keys([build_loader(cfg)], epoch))
        assert {k: counts[k] for k in keys_a} == {k: 2 for k in keys_a}  # each of a twice
        assert sum(counts[k] for k in keys_b) == 3 and {counts[k] for k in keys_b} <= {0, 1}
        assert sum(counts.values()) == 11
    first = assert_stream_resumes_exactly(cfg, cut=6, total=16)
    other = build_loader(_cfg([shards[0], {**shards[1], "weight": 1}]))
    with pytest.raises(DataError, match="'mix'"):  # another mix does not resume this stream
        other.load_state_dict(first.state_dict())


def test_loader_weighted_epoch_resplit_across_world_sizes_sees_each_draw_once(mixed):
    shards, keys_a, keys_b = mixed
    cfg = _cfg(shards)
    whole = collections.Counter(_epoch_keys([build_loader(cfg)]))
    two = [build_loader(cfg, rank=r, world_size=2) for r in range(2)]
    seen = []
    for loader in two:
        it = iter(loader)
        seen += [k for _ in range(3) for k in next(it)["_keys"]]
    states = json.loads(json.dumps([loader.state_dict() for loader in two]))
    one = build_loader(cfg)
    one.resume(states)
    rest = _epoch_keys([one])
    assert len(seen) == 6 and len(seen) + len(rest) == 11
    assert collections.Counter(seen + rest) == whole  # the uninterrupted epoch's draws, each once
    assert {k: whole[k] for k in keys_a} == {k: 2 for k in keys_a} and sum(whole[k] for k in keys_b) == 3


@pytest.mark.parametrize(
    "shards,key",
    [
        ([{"path": "a", "weight": 0}], r"data.shards\[0\].weight"),
        ([{"path": "a", "weight": -1.5}], r"data.shards\[0\].weight"),
        ([{"path": "a", "weight": "heavy"}], r"data.shards\[0\].weight"),
        ([{"path": "a", "weight": True}], r"data.shards\[0\].weight"),
        ([{"weight": 2}], r"data.shards\[0\].path"),
        (["a", {"path": "b", "wieght": 2}], r"data.shards\[1\]'.*wieght"),
        (["a", {"path": "a/", "weight": 2}], r"'data.shards'.*listed twice"),
        ([], r"'data.shards'"),
    ],
)
def test_bad_weights_and_duplicate_splits_are_config_errors(shards, key):
    with pytest.raises(ConfigError, match=key):
        _cfg(shards)
