"""Shard writer, manifest and synthetic archives: write then read gives back the same arrays."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from maestro.errors import DataError
from maestro.modalities import preset
from shards import manifest, reader
from shards.schema import load_npy
from shards.synth import SynthItem, items, read_item, write_synthetic
from shards.writer import Bad, ShardWriter, write_split

SMALL = {"aerial": 32, "spot": 16, "dem": 32, "s2": 6, "s1_asc": 6, "s1_des": 6, "s1": 6}


def _assert_same(a, b) -> None:
    assert a.key == b.key and a.meta == b.meta
    assert list(a.arrays) == list(b.arrays)
    for mod in a.arrays:
        assert a.arrays[mod].dtype == b.arrays[mod].dtype
        np.testing.assert_array_equal(a.arrays[mod], b.arrays[mod])  # NaNs compare equal here
        np.testing.assert_array_equal(a.dates[mod], b.dates[mod])
    assert set(a.valid) == set(b.valid) and set(a.targets) == set(b.targets)
    for mod in a.valid:
        np.testing.assert_array_equal(a.valid[mod], b.valid[mod])
    for name in a.targets:
        np.testing.assert_array_equal(a.targets[name], b.targets[name])


@pytest.mark.parametrize("name", ["treesatai_ts", "pastis_hd", "flair_hub", "flair2", "s2_naip"])
def test_synthetic_round_trip(tmp_path, name):
    m = write_synthetic(str(tmp_path), name, 5, seed=3, sizes=SMALL, max_dates=12, shard_samples=2)
    assert [s["samples"] for s in m["shards"]] == [2, 2, 1]
    assert [s["name"] for s in m["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert manifest.read(str(tmp_path / "train")) == json.loads(json.dumps(m))
    expected = [read_item(it) for it in items(name, 5, 3, "train", SMALL, 12)]
    got = list(reader.iter_split(str(tmp_path / "train")))
    assert len(got) == 5
    for a, b in zip(expected, got):
        _assert_same(a, b)
        assert set(b.arrays) == set(preset(name).modalities)
        for mod, x in b.arrays.items():
            assert x.dtype == np.dtype(preset(name).modalities[mod].dtype)
    assert set(m["modalities"]) == set(preset(name).modalities)


def test_synthetic_is_deterministic_and_seed_dependent():
    a = read_item(SynthItem("treesatai_ts", 7, 4, "train"))
    b = read_item(SynthItem("treesatai_ts", 7, 4, "train"))
    c = read_item(SynthItem("treesatai_ts", 8, 4, "train"))
    _assert_same(a, b)
    assert not np.array_equal(a.arrays["aerial"], c.arrays["aerial"])


def test_synthetic_treesatai_has_real_shapes_and_patterns():
    s = read_item(SynthItem("treesatai_ts", 0, 1, "train"))
    assert s.arrays["aerial"].shape == (1, 4, 304, 304) and s.arrays["aerial"].dtype == np.uint8
    t2 = s.arrays["s2"].shape[0]
    assert 40 <= t2 <= 150 and s.arrays["s2"].shape[1:] == (10, 6, 6)
    assert s.valid["s2"].shape == (t2, 6, 6) and 0 < s.valid["s2"].mean() < 1  # clouds, not everywhere
    doy = s.dates["s1_des"][:, 1]
    assert (np.diff(doy) >= 0).all() and (np.diff(doy) == 0).any()  # sorted, same-day slices
    assert s.targets["treesat_mlc"].shape == (15,) and s.targets["treesat_mlc"].sum() >= 1
    assert s.meta["ref_date"] == [int(v) for v in s.dates["aerial"][0]]


def test_labels_follow_the_time_series():
    """Samples of one dominant class share a vegetation peak: the label is predictable from S2."""
    peaks = {}
    for i in range(40):
        s = read_item(SynthItem("treesatai_ts", 1, i, "train", (("aerial", 16),), 60))
        clear = s.valid["s2"].all((1, 2)).astype(bool)
        x = s.arrays["s2"][clear].astype(np.float64)
        v = (x[:, 6] - x[:, 2]) / (x[:, 6] + x[:, 2])  # NDVI from B08, B04: (T', H, W)
        doy = s.dates["s2"][clear, 1]
        main, share = max(s.meta["fractions"].items(), key=lambda kv: kv[1])
        if share > 0.6:
            peaks.setdefault(main, []).append(doy[v.mean((1, 2)).argmax()])
    spreads = [np.std(p) for p in peaks.values() if len(p) >= 3]
    overall = np.std([d for p in peaks.values() for d in p])
    assert spreads and np.mean(spreads) < overall


def test_writer_splits_by_size_and_records_sha(tmp_path):
    m = write_synthetic(str(tmp_path), "treesatai_ts", 6, sizes={"aerial": 64}, shard_bytes=150_000)
    assert len(m["shards"]) >= 2 and sum(s["samples"] for s in m["shards"]) == 6
    import hashlib

    for s in m["shards"]:
        data = (tmp_path / "train" / s["name"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    stats = m["statistics"]["modalities"]["s2"]["B04"]
    assert stats["count"] > 0 and stats["std"] > 0 and stats["percentiles"]["p5"] <= stats["mean"]
    assert "provenance" in m["statistics"]


def test_writer_refuses_to_overwrite(tmp_path):
    write_synthetic(str(tmp_path), "treesatai_ts", 2, sizes=SMALL)
    with pytest.raises(DataError, match="refusing to overwrite"):
        write_synthetic(str(tmp_path), "treesatai_ts", 2, sizes=SMALL)
    m = write_synthetic(str(tmp_path), "treesatai_ts", 3, sizes=SMALL, overwrite=True)
    assert manifest.total_samples(manifest.read(str(tmp_path / "train"))) == m["samples"] == 3


def _read_or_fail(i: int):
    if i == 1:
        raise DataError(f"item {i}: truncated file")
    return read_item(SynthItem("treesatai_ts", 0, i, "train", tuple(SMALL.items()), 8))


def _writer(url: str) -> ShardWriter:
    p = preset("treesatai_ts")
    return ShardWriter(url, dataset="treesatai_ts", split="train", modalities=p.modalities)


def test_bad_samples_skipped_or_fatal(tmp_path):
    m = write_split(_writer(str(tmp_path / "a")), _read_or_fail, range(4), skip_bad=True)
    assert m["samples"] == 3 and m["skipped"] == [{"sample": "1", "reason": "item 1: truncated file"}]
    with pytest.raises(DataError, match="truncated"):
        write_split(_writer(str(tmp_path / "b")), _read_or_fail, range(4))
    assert not (tmp_path / "b" / "manifest.json").exists()
    assert Bad("x", "y").sample_id == "x"


def test_one_worker_reads_a_generator_one_sample_at_a_time(tmp_path):
    """`shards.own.write_samples` hands its caller's generator to `write_split`: each sample is
    written before the next one is asked for, so a split larger than memory streams through."""
    writer = _writer(str(tmp_path / "a"))
    seen = []

    def items():
        for i in (0, 2, 3):
            seen.append(writer.samples)
            yield i

    m = write_split(writer, _read_or_fail, items())
    assert m["samples"] == 3
    assert seen == [0, 1, 2]  # each written before the generator is asked for the next


def test_parallel_workers_give_identical_shards(tmp_path):
    one = write_synthetic(str(tmp_path / "one"), "treesatai_ts", 6, sizes=SMALL, shard_samples=4)
    two = write_synthetic(str(tmp_path / "two"), "treesatai_ts", 6, sizes=SMALL, shard_samples=4, workers=2)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]


@pytest.mark.parametrize(
    "a",
    [
        np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5),
        np.array([1.5, np.nan, -2.0], dtype=">f4"),
        np.array(7, dtype=np.int16),
        np.zeros((0, 3), np.float32),
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        np.zeros(2, [("a", "<i4"), ("b", "<f8")]),
    ],
    ids=["uint8", "big-endian", "0-d", "empty", "fortran", "structured"],
)
def test_load_npy_gives_what_np_load_gives(a):
    buf = io.BytesIO()
    np.save(buf, a)
    got = load_npy(buf.getvalue(), "member")
    assert got.dtype == a.dtype and got.shape == a.shape
    np.testing.assert_array_equal(got, a)
    if a.flags.c_contiguous and a.dtype.names is None:  # the plain headers np.save writes: a view
        assert not got.flags.writeable


def test_load_npy_refuses_pickles_and_short_data():
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="member: refused"):
        load_npy(buf.getvalue(), "member")
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 4), np.float32))
    with pytest.raises(DataError, match="member: refused"):
        load_npy(buf.getvalue()[:-4], "member")
