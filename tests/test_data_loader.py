"""The streaming loader end to end: splitting, determinism, exact resume, packing, faults, S3.

Archives are tiny synthetic TreeSatAI-TS splits written by the shard writer (`shards.synth`),
with a 30 px aerial tile (2 m pixels) so that real data-loader worker processes stay fast.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from maestro import config, storage
from maestro.data import build_loader
from maestro.data.arena import ALIGN, MAX_SLOTS, Arena, unpack
from maestro.data.bench import simulated_pinning
from maestro.data.collate import collate_packed, collate_padded
from maestro.data.loader import _ShardOrder
from maestro.data.prepare import Recipe, prepare, select
from maestro.errors import DataError
from shards.index import build_index, read_index, write_index
from shards.reader import read_samples
from shards.schema import decode
from shards.synth import write_synthetic

AERIAL = {"aerial": {"resolution_m": 2.0, "image_size": 30, "patch_size": 10}}
ALL_DATES = {
    **AERIAL,
    "s2": {"dates": "all"},
    "s1_asc": {"dates": "all"},
    "s1_des": {"dates": "all"},
}


def _archive(
    root: Path | str, samples: int = 23, shard_samples: int = 5, seed: int = 1, max_dates: int | None = 20
) -> str:
    write_synthetic(str(root), "treesatai_ts", samples, seed=seed, sizes={"aerial": 34}, max_dates=max_dates,
                    shard_samples=shard_samples)  # fmt: skip
    return storage.join(str(root), "train")


def _cfg(url: str, **data) -> config.Config:
    base = {"shards": url, "batch_size": 4, "workers": 2, "shuffle_buffer": 6, "modalities": AERIAL}
    return config.from_dict({"data": {**base, **data}})


def _take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k, v in x.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, y[k]), k
            else:
                assert v == y[k], k


def _rewrite_manifest(split: str) -> None:
    """Make the manifest and indexes agree with the shards' sizes and hashes after a test tampered with them."""
    path = Path(split) / "manifest.json"
    m = json.loads(path.read_text())
    for s in m["shards"]:
        data = (Path(split) / s["name"]).read_bytes()
        s["bytes"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        write_index(f"{split}/{s['name']}", build_index(f"{split}/{s['name']}"))
    path.write_text(json.dumps(m))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> str:
    return _archive(tmp_path_factory.mktemp("archive"))


def test_reference_date_of_a_sensor_that_is_not_an_input(archive):
    """TreeSatAI-TS takes its reference date from the aerial image: without aerial among the inputs
    it is read from the stored aerial dates (not the aerial array), the same as with it."""
    kw = {"workers": 0, "shuffle_buffer": 1}
    with_aerial = _take(build_loader(_cfg(archive, inputs=["aerial", "s2"], **kw), train=False), 3)
    without = _take(build_loader(_cfg(archive, inputs=["s2"], **kw), train=False), 3)
    for a, b in zip(with_aerial, without):
        assert a["_keys"] == b["_keys"] and "aerial" not in b
        assert torch.equal(a["ref_date"], b["ref_date"])
        assert torch.equal(a["s2"], b["s2"])


@pytest.mark.parametrize("shard_samples", [5, 12])  # 5 shards, and 2 shards for 4 readers
def test_epoch_reads_every_sample_once_across_two_ranks_and_two_workers(tmp_path, shard_samples):
    url = _archive(tmp_path, 23, shard_samples)
    seen = []
    for rank in range(2):
        loader = build_loader(_cfg(url, batch_size=1), rank=rank, world_size=2)
        keys = [b["_keys"][0] for b in _take(loader, 30) if b["_epoch"] == 0]
        seen.append(keys)
    assert len(seen[0]) + len(seen[1]) == 23
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 23


def _epoch_keys(loader, n: int, epoch: int = 0) -> list[str]:
    return [k for b in _take(loader, n) if b["_epoch"] == epoch for k in b["_keys"]]


def test_resume_with_other_ranks_and_workers_sees_each_sample_of_the_epoch_once(tmp_path):
    """Elastic restart: 2 ranks × 2 workers stop mid-epoch, 3 ranks × 1 worker go on, stop again,
    and 1 rank × 2 workers finish the epoch: every sample exactly once, the next epoch whole."""
    url = _archive(tmp_path, 23, 5)

    def layout(world, workers, states, n):
        loaders = [build_loader(_cfg(url, batch_size=1, workers=workers), r, world) for r in range(world)]
        keys = []
        for loader in loaders:
            if states:
                loader.resume(json.loads(json.dumps(states)))  # as stored: JSON-able
            keys += _epoch_keys(loader, n)
        return keys, [loader.state_dict() for loader in loaders]

    first, two_ranks = layout(2, 2, None, 3)
    second, states = layout(3, 0, two_ranks, 2)
    assert len(first) == 6 and len(second) == 6
    last = build_loader(_cfg(url, batch_size=1, workers=2))
    last.resume(json.loads(json.dumps(states)))
    batches = _take(last, 60)  # the rest of epoch 0, all of epoch 1 (workers run unevenly), some of 2
    seen = first + second + [k for b in batches if b["_epoch"] == 0 for k in b["_keys"]]
    assert len(seen) == len(set(seen)) == 23, sorted(seen)
    after = [k for b in batches if b["_epoch"] == 1 for k in b["_keys"]]
    assert len(after) == len(set(after)) == 23  # the next epoch is whole again
    with pytest.raises(DataError, match="all 2 ranks"):
        build_loader(_cfg(url, batch_size=1), 0, 1).resume([two_ranks[1]])


def test_same_seed_same_batches_and_another_seed_differs(archive):
    a = _take(build_loader(_cfg(archive)), 5)
    b = _take(build_loader(_cfg(archive)), 5)
    _assert_batches_equal(a, b)
    c = _take(build_loader(_cfg(archive, seed=7)), 5)
    assert [x["_keys"] for x in a] != [x["_keys"] for x in c]
    first = a[0]
    assert first["s2"].shape == (4, 16, 10, 6, 6) and first["s2"].dtype == torch.float32
    assert first["s2_dates"].shape == (4, 16, 3) and first["ref_date"].shape == (4, 1, 3)
    assert first["aerial"].shape == (4, 1, 4, 30, 30) and first["s2_valid"].dtype == torch.bool
    assert all(torch.isfinite(x[m]).all() for x in a for m in ("aerial", "s2", "s1_asc", "s1_des"))


@pytest.mark.parametrize(
    ("data", "k", "n"),
    [({}, 3, 9), ({"modalities": ALL_DATES, "token_budget": 2400, "workers": 2}, 5, 8)],
    ids=["padded", "packed"],
)
def test_restore_after_k_batches_equals_uninterrupted_stream(archive, data, k, n):
    whole = _take(build_loader(_cfg(archive, **data)), n)
    first = build_loader(_cfg(archive, **data))
    _assert_batches_equal(_take(first, k), whole[:k])
    state = json.loads(json.dumps(first.state_dict()))
    restored = build_loader(_cfg(archive, **data))
    restored.load_state_dict(state)
    assert restored.epoch == first.epoch
    _assert_batches_equal(_take(restored, n - k), whole[k:])
    with pytest.raises(DataError, match="workers"):
        build_loader(_cfg(archive, **{**data, "workers": 1})).load_state_dict(state)


def test_packed_batches_hold_no_padding_beyond_the_last_sample(archive):
    budget = 2400
    cfg = _cfg(archive, modalities=ALL_DATES, token_budget=budget, workers=0)
    batches = _take(build_loader(cfg), 6)
    specs = cfg.derived.modalities
    for b, nxt in itertools.pairwise(batches):
        cu = b["cu_seqlens"]
        n = len(b["_keys"])
        assert cu.shape == (n + 1,) and int(cu[-1]) <= budget
        tokens = torch.zeros(n, dtype=torch.int64)
        for m, s in specs.items():
            lengths = b[f"{m}_cu_dates"].diff()
            assert b[m].shape[1] == int(b[f"{m}_cu_dates"][-1])  # dates concatenated, none padded
            tokens += lengths * len(s.groups) * s.tokens_per_date
        assert torch.equal(cu.diff(), tokens.to(cu.dtype))
        assert int(cu[-1]) + int(nxt["cu_seqlens"][1]) > budget  # the next sample did not fit
        assert b["_padding_fraction"] == pytest.approx((budget - int(cu[-1])) / budget)
        assert not [k for k in b if k.startswith("cu_seqlens_")]  # per-group counts: the model derives them


def test_padded_all_dates_flags_padding(tmp_path):
    # Uncapped synthetic series have irregular date counts, so a batch of 4 needs padding.
    cfg = _cfg(_archive(tmp_path, samples=8, max_dates=None), modalities=ALL_DATES, workers=0)
    (b,) = _take(build_loader(cfg), 1)
    n = b["s2_ndates"]
    assert n.dtype == torch.int64 and n.shape == (4,)
    assert int(n.min()) < int(n.max()) == b["s2"].shape[1]
    for i in range(len(n)):
        assert not b["s2_valid"][i, int(n[i]) :].any() and (b["s2"][i, int(n[i]) :] == 0).all()
    assert 0.0 < b["_padding_fraction"] < 1.0


def _tamper_member(split: str, shard: str, key: str, suffix: str, data: bytes) -> None:
    """Rewrite one member of a shard (tests only: a hostile or damaged shard)."""
    path = Path(split) / shard
    out = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for info in src.getmembers():
            body = src.extractfile(info).read()
            if info.name == f"{key}.{suffix}":
                body, info.size = data, len(data)
            dst.addfile(info, io.BytesIO(body))
    path.write_bytes(out.getvalue())
    _rewrite_manifest(split)


def test_shard_with_a_pickle_member_is_refused(tmp_path):
    url = _archive(tmp_path, 10, 5)
    m = json.loads((Path(url) / "manifest.json").read_text())
    key = read_index(f"{url}/{m['shards'][0]['name']}").keys[2]
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    _tamper_member(url, m["shards"][0]["name"], key, "s2.npy", pickled.getvalue())
    with pytest.raises(DataError, match="refused"):
        _take(build_loader(_cfg(url, batch_size=1, workers=0, strict=True)), 10)
    loader = build_loader(_cfg(url, batch_size=1, workers=0))
    batches = _take(loader, 9)
    keys = [b["_keys"][0] for b in batches]
    assert key not in keys and len(set(keys)) == 9 and batches[-1]["_skipped"] == 1
    assert loader.skipped_samples() == 1


def test_corrupt_shard_is_skipped_and_counted_while_the_rest_streams(tmp_path):
    url = _archive(tmp_path, 15, 5)
    m = json.loads((Path(url) / "manifest.json").read_text())
    bad = Path(url) / m["shards"][1]["name"]
    data = bytearray(bad.read_bytes())
    mid = len(data) // 3
    data[mid : 2 * mid] = bytes(range(256)) * (mid // 256) + bytes(mid % 256)  # same size, garbage inside
    bad.write_bytes(bytes(data))
    loader = build_loader(_cfg(url, batch_size=1, workers=2, shuffle_buffer=0))
    batches = _take(loader, 40)
    epoch0 = [b["_keys"][0] for b in batches if b["_epoch"] == 0]
    good = {k for s in (m["shards"][0], m["shards"][2]) for k in read_index(f"{url}/{s['name']}").keys}
    assert good <= set(epoch0) and len(epoch0) == len(set(epoch0))
    lost = 15 - len(epoch0)
    assert lost > 0
    per_epoch_skips = batches[-1]["_skipped"]
    assert per_epoch_skips >= lost and loader.skipped_samples() == per_epoch_skips
    with pytest.raises(DataError):
        _take(build_loader(_cfg(url, batch_size=1, workers=0, shuffle_buffer=0, strict=True)), 15)


def test_manifest_that_does_not_match_the_shards_is_an_error_at_start(tmp_path):
    url = _archive(tmp_path, 10, 5)
    shard = Path(url) / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])
    with pytest.raises(DataError, match="manifest says"):
        build_loader(_cfg(url))
    build_loader(_cfg(url), rank=1, world_size=2)  # rank 0 lists the shards and checks; others do not
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        build_loader(_cfg(url))


class _Flaky(io.BytesIO):
    fails = 0

    def read(self, n=-1):
        if _Flaky.fails > 0 and self.tell() > 0:
            _Flaky.fails -= 1
            raise ConnectionResetError("connection reset by peer")
        return super().read(n)


def test_transient_read_errors_are_retried(archive):
    shard = storage.join(archive, "train-000000.tar")
    blob = storage.read_bytes(shard)
    expected = [k for k, _ in read_samples(shard, lambda k: True, lambda u: io.BytesIO(blob))]
    _Flaky.fails = 2
    got = [k for k, _ in read_samples(shard, lambda k: True, lambda u: _Flaky(blob), backoff=0.001)]
    assert got == expected and len(got) == 5 and _Flaky.fails == 0
    _Flaky.fails = 100
    with pytest.raises(OSError):
        list(read_samples(shard, lambda k: True, lambda u: _Flaky(blob), retries=2, backoff=0.001))
    assert _Flaky.fails == 97


def test_s3_stream_matches_local_and_survives_a_lost_object(tmp_path, s3_bucket, archive):
    url = _archive(f"s3://{s3_bucket}/ts", 23, 5)
    _assert_batches_equal(_take(build_loader(_cfg(url)), 4), _take(build_loader(_cfg(archive)), 4))
    loader = build_loader(_cfg(url, batch_size=1))
    storage.remove(storage.join(url, "train-000002.tar"))  # lost after the start: read errors
    batches = _take(loader, 30)
    epoch0 = [b["_keys"][0] for b in batches if b["_epoch"] == 0]
    assert len(epoch0) == 18 and len(set(epoch0)) == 18
    assert batches[-1]["_skipped"] >= 5


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("modalities", [AERIAL, ALL_DATES], ids=["bins", "all-dates"])
def test_batch_scaling_equals_scaling_each_sample_on_its_own(archive, train, modalities):
    """The loader's raw items scaled into the batch buffers give the reference's per-sample values."""
    cfg = _cfg(archive, modalities=modalities, token_budget=0)
    recipe = Recipe.from_config(cfg, train)
    first = json.loads((Path(archive) / "manifest.json").read_text())["shards"][0]["name"]
    samples = [decode(k, m) for k, m in read_samples(f"{archive}/{first}", lambda k: True, storage.open_file)]
    raw = [it for i, s in enumerate(samples) for it in select(s, recipe, np.random.default_rng(i), s.key)]
    ref = [it for i, s in enumerate(samples) for it in prepare(s, recipe, np.random.default_rng(i), s.key)]
    if modalities is ALL_DATES:  # every date kept: the synthetic NaNs are holes zeroed after scaling
        assert any(it[f"{m}_hole"] is not None for it in raw for m in recipe.specs)
    targets = list(recipe.targets)
    for collate in (
        lambda items: collate_padded(items, recipe.specs, targets),
        lambda items: collate_packed(items, recipe.specs, targets, 10**6),
    ):
        a, b = collate(raw), collate(ref)
        assert a.keys() == b.keys()
        for k, v in a.items():
            assert torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k], k


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_held_by_the_consumer_are_never_overwritten(archive, workers):
    """Arena contract: a slot is reused only once no tensor of its batch is referenced."""
    it = iter(build_loader(_cfg(archive, workers=workers)))
    held, copies = [], []
    for _ in range(2 * MAX_SLOTS):  # more than the arenas hold: the rest get buffers of their own
        held.append(next(it))
        copies.append({k: v.clone() for k, v in held[-1].items() if isinstance(v, torch.Tensor)})
    view = held[0]["s2"][1:]  # a view alone keeps its batch's slot busy
    kept, kept_copy = held[1], copies[1]  # so does a batch kept whole
    for b, c in zip(held[1:], copies[1:]):  # nothing was overwritten while every slot was busy
        for k, v in c.items():
            assert torch.equal(b[k], v), k
    del held, b
    ptrs = []
    for _ in range(12):  # the other slots are free again, and batches dropped at once give theirs back
        ptrs.append(next(it)["aerial"].data_ptr())
    assert len(set(ptrs)) < len(ptrs), "no slot was reused"
    assert torch.equal(view, copies[0]["s2"][1:])
    for k, v in kept_copy.items():
        assert torch.equal(kept[k], v), k


def test_arena_reuses_a_slot_only_after_its_batch_is_gone():
    arena = Arena(shared=False, max_slots=2)
    layout = {"x": ((3, 5), np.float32), "v": ((3,), bool)}

    def batch(fill: float) -> dict[str, torch.Tensor]:
        """One batch through the arena as the loader moves it: buffers, filled, packed, unpacked."""
        buffers = arena.buffers(layout)
        buffers["x"][1][...] = fill
        return unpack(arena.pack({name: t for name, (t, _) in buffers.items()}))

    def slot_of(b) -> int | None:
        p = b["x"].data_ptr()
        return next((i for i, s in enumerate(arena.slots) if 0 <= p - s.ctypes.data < len(s)), None)

    a, b = batch(0), batch(1)
    assert (slot_of(a), slot_of(b)) == (0, 1)
    assert slot_of(batch(2)) is None  # both busy: a buffer of its own (dropped at once)
    x = a["x"][1:]  # a view of one tensor keeps the whole batch's slot busy
    del a
    assert slot_of(batch(3)) is None
    del x
    c = batch(7)
    assert slot_of(c) == 0
    assert (b["x"] == 1).all() and (c["x"] == 7).all()


def test_pinned_batches_are_one_copy_each_and_their_slots_come_back(archive):
    """Through torch's own pin-memory thread (an accelerator simulated, pinning a copy): each batch
    is pinned as one buffer, its tensors are views of that copy, and the worker's arena slots are
    released, so no batch needs a buffer of its own; the values are the unpinned stream's."""
    cfg = _cfg(archive, workers=2)
    plain = _take(build_loader(cfg), 4 * MAX_SLOTS)
    with simulated_pinning() as copies:
        loader = build_loader(cfg)
        assert loader.pin
        it = iter(loader)
        pinned = [next(it) for _ in range(4 * MAX_SLOTS)]
        made = copies[0]
        it.close()
    assert made >= len(pinned)  # the pin thread may have pinned a few prefetched batches more
    assert made <= len(pinned) + 2 * 2  # prefetch_factor × workers: one copy per batch, never per tensor
    for b in pinned:  # views of the one pinned copy
        assert len({v.untyped_storage().data_ptr() for v in b.values() if isinstance(v, torch.Tensor)}) == 1
    for b in pinned + plain:  # pinned or not, the arrays lie side by side in one buffer
        tensors = [v for v in b.values() if isinstance(v, torch.Tensor)]
        start = min(t.data_ptr() for t in tensors)
        extent = max(t.data_ptr() + t.nbytes for t in tensors) - start
        assert extent <= sum(t.nbytes for t in tensors) + ALIGN * len(tensors)
    assert loader.own_buffers == 0  # every batch found a released slot
    _assert_batches_equal(pinned, plain)


def _flair_hub(root: Path) -> tuple[str, dict]:
    """A tiny FLAIR-HUB split (segmentation targets `cosia`, `lpis`) and the matching modality sizes."""
    write_synthetic(str(root), "flair_hub", 8, seed=0, sizes={"aerial": 64, "dem": 64}, max_dates=6,
                    shard_samples=4)  # fmt: skip
    side = {"image_size": 64, "resolution_m": 1.6, "patch_size": 16}
    return storage.join(str(root), "train"), {"aerial": side, "dem": side}


def test_pretraining_batches_carry_no_targets_and_never_decode_them(tmp_path):
    url, mods = _flair_hub(tmp_path)
    shard = sorted(p.name for p in Path(url).glob("*.tar"))[0]
    with tarfile.open(Path(url) / shard) as tar:
        key = tar.getnames()[0].split(".")[0]
    _tamper_member(url, shard, key, "cosia.npy", b"not an array")  # a target no pretraining reads
    cfg = _cfg(url, dataset="flair_hub", modalities=mods, batch_size=2, workers=0, strict=True,
               targets=["cosia", "lpis"])  # fmt: skip
    batches = _take(build_loader(cfg), 4)
    keys = [k for b in batches for k in b["_keys"]]
    assert len(set(keys)) == 8 and key in keys  # the sample with the damaged target trains
    for b in batches:
        assert not {"cosia", "lpis"} & set(b) and "spot" not in b  # no targets, no unused sensor
    with pytest.raises(DataError, match="cosia"):  # an evaluation reads them: the damage shows
        _take(build_loader(cfg, targets=True), 4)
    clean, _ = _flair_hub(tmp_path / "clean")
    both = _cfg(
        clean, dataset="flair_hub", modalities=mods, batch_size=2, workers=0, targets=["cosia", "lpis"]
    )
    (b,) = _take(build_loader(both, targets=True), 1)
    assert b["cosia"].shape == b["lpis"].shape == (2, 64, 64)


def test_read_ahead_foresees_each_shard_a_reader_opens_next_across_epochs(archive):
    """The read-ahead of an S3 worker names, after each shard it opens, the one it opens next."""
    loader = build_loader(_cfg(archive))
    plan = loader.plan
    seq = [plan.shards[u.shard].url for e in range(3) for u in plan.epoch_order(e, 1).units]
    order = _ShardOrder(plan, 1, 0)
    assert [order(url) for url in seq[:-1]] == seq[1:]
    late = _ShardOrder(plan, 1, 1)  # resumed in epoch 1 past its first shard: it finds its place
    n = len(plan.epoch_order(0, 1).units)
    assert late(seq[n + 1]) == seq[n + 2]
