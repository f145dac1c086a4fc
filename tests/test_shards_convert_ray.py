"""Conversion as Ray tasks (2 local workers): the same shards, byte for byte, as a one-process
conversion, one manifest written last (also on S3, a moto server), and a rerun after a failure
writes only the missing parts."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

from maestro import local_ray, storage
from maestro.errors import DataError
from maestro.modalities import preset
from shards import fanout, reader
from shards import manifest as manifest_io
from shards.synth import items, read_item, write_synthetic

SIZES = {"aerial": 20}


@pytest.fixture(scope="module", autouse=True)
def ray_for_module(s3_endpoint):  # the S3 variables first, so the Ray workers inherit them
    # A new local Ray on 127.0.0.1 (plain `ray.init()` would join a cluster another test file
    # started on this machine: test_elastic_ray's, when files run side by side).
    local_ray.start(2, object_store_memory=128 * 2**20, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # _failing_read below
    yield
    ray.shutdown()


def _failing_read(flag: Path, index: int, item):
    if item.index == index and flag.exists():
        raise DataError(f"sample {item.index}: made to fail while {flag} exists")
    return read_item(item)


def test_two_ray_workers_write_the_one_process_shards(tmp_path):
    kw = {"sizes": SIZES, "max_dates": 4, "shard_samples": 3}
    one = write_synthetic(str(tmp_path / "one"), "treesatai_ts", 10, 3, **kw)
    two = write_synthetic(str(tmp_path / "two"), "treesatai_ts", 10, 3, **kw, ray="", workers=2)
    assert [s["sha256"] for s in two["shards"]] == [s["sha256"] for s in one["shards"]]
    assert [s["samples"] for s in two["shards"]] == [3, 3, 3, 1]
    assert two["samples"] == 10 and two["split"] == "train" and two["bytes"] == one["bytes"]
    for mod, bands in one["statistics"]["modalities"].items():
        for band, s in bands.items():
            got = two["statistics"]["modalities"][mod][band]
            assert got["count"] == s["count"] and got["mean"] == pytest.approx(s["mean"], rel=1e-9)
            assert got["std"] == pytest.approx(s["std"], rel=1e-6)
    split = tmp_path / "two" / "train"
    assert sorted(p.name for p in split.iterdir()) == sorted(
        ["manifest.json", *(s["name"] for s in two["shards"]), *(s["index"]["name"] for s in two["shards"])]
    )
    assert manifest_io.read(str(split))["samples"] == 10  # a valid manifest, written last
    keys = [s.key for s in reader.iter_split(str(split))]
    assert keys == [s.key for s in reader.iter_split(str(tmp_path / "one" / "train"))]


def test_a_rerun_after_a_failure_writes_only_the_missing_parts(tmp_path):
    flag = tmp_path / "fail"
    flag.touch()
    todo = items("treesatai_ts", 8, 5, "train", SIZES, 3)
    read = functools.partial(_failing_read, flag, 5)  # sample 5 is in part 2 of 4
    url = str(tmp_path / "out" / "train")
    spec = {"dataset": "treesatai_ts", "modalities": preset("treesatai_ts").modalities, "shard_samples": 2}
    with pytest.raises(DataError, match="sample 5: made to fail"):
        fanout.write_split_ray(url, "train", read, todo, **spec)
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()
    parts = tmp_path / "out" / "train" / fanout.PARTS
    done = {
        p.name: p.stat().st_mtime_ns
        for p in parts.glob("part-*/*.tar")
        if (p.parent / "manifest.json").exists()
    }
    assert len(done) == 3  # every part but the failed one finished
    flag.unlink()
    with pytest.raises(DataError, match="another assignment"):
        fanout.write_split_ray(url, "train", read, todo, **{**spec, "shard_samples": 4})
    m = fanout.write_split_ray(url, "train", read, todo, **spec)
    split = tmp_path / "out" / "train"
    kept = {n: (split / n).stat().st_mtime_ns for n in done}
    assert kept == done  # moved, never rewritten
    assert not parts.exists() and m["samples"] == 8 and len(m["shards"]) == 4
    whole = write_synthetic(
        str(tmp_path / "ref"), "treesatai_ts", 8, 5, sizes=SIZES, max_dates=3, shard_samples=2
    )
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in whole["shards"]]
    got = next(iter(reader.iter_split(str(split))))
    np.testing.assert_array_equal(got.arrays["s2"], read_item(todo[0]).arrays["s2"])


def test_a_real_archive_converts_as_ray_tasks_to_the_one_process_shards(fixtures_dir, tmp_path):
    from shards.convert import convert

    root = fixtures_dir / "treesatai_ts"
    one = convert("treesatai_ts", root, str(tmp_path / "one"), shard_samples=1)
    two = convert("treesatai_ts", root, str(tmp_path / "two"), shard_samples=1, ray="", workers=2)
    assert set(two) == {"train", "val", "test"}
    for split, m in one.items():
        assert [s["sha256"] for s in two[split]["shards"]] == [s["sha256"] for s in m["shards"]]
        assert two[split]["statistics"]["modalities"].keys() == m["statistics"]["modalities"].keys()


def test_an_existing_split_is_kept_unless_overwrite(tmp_path):
    kw = {"sizes": SIZES, "max_dates": 3, "shard_samples": 2}
    first = write_synthetic(str(tmp_path), "treesatai_ts", 4, 0, **kw)
    with pytest.raises(DataError, match="already holds a split"):
        write_synthetic(str(tmp_path), "treesatai_ts", 4, 1, **kw, ray="")
    again = write_synthetic(str(tmp_path), "treesatai_ts", 4, 1, **kw, ray="", overwrite=True)
    names = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert names == sorted(
        [
            "manifest.json",
            *(s["name"] for s in again["shards"]),
            *(s["index"]["name"] for s in again["shards"]),
        ]
    )  # the old shards are gone
    assert [s["sha256"] for s in again["shards"]] != [s["sha256"] for s in first["shards"]]


def test_ray_tasks_write_to_s3(s3_bucket, tmp_path):
    kw = {"sizes": SIZES, "max_dates": 3, "shard_samples": 2}
    url = f"s3://{s3_bucket}/synth"
    m = write_synthetic(url, "treesatai_ts", 5, 2, **kw, ray="")
    local = write_synthetic(str(tmp_path), "treesatai_ts", 5, 2, **kw)
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in local["shards"]]
    assert manifest_io.read(f"{url}/train")["samples"] == 5
    assert sorted(storage.list_names(f"{url}/train")) == sorted(
        ["manifest.json", *(s["name"] for s in m["shards"]), *(s["index"]["name"] for s in m["shards"])]
    )
    assert [s.key for s in reader.iter_split(f"{url}/train")] == [
        s.key for s in reader.iter_split(str(tmp_path / "train"))
    ]


def test_a_merge_interrupted_after_some_moves_completes_on_rerun(tmp_path):
    todo = items("treesatai_ts", 6, 4, "train", SIZES, 3)
    url = str(tmp_path / "out" / "train")
    spec = {"dataset": "treesatai_ts", "modalities": preset("treesatai_ts").modalities, "shard_samples": 2}
    fanout._check_plan(url, {"items": 6, "shard_samples": 2, "dataset": "treesatai_ts"}, False)
    for k in range(3):  # every part finished ...
        fanout.write_part(fanout.Part(url, "train", k, tuple(todo[2 * k : 2 * k + 2]), read_item,
                                      "treesatai_ts", spec["modalities"], {}, "", 2, False))  # fmt: skip
    moved = next((tmp_path / "out" / "train" / fanout.PARTS / "part-000001").glob("*.tar"))
    moved.rename(tmp_path / "out" / "train" / moved.name)  # ... and the merge stopped after one move
    m = fanout.write_split_ray(url, "train", read_item, todo, **spec)
    whole = write_synthetic(
        str(tmp_path / "ref"), "treesatai_ts", 6, 4, sizes=SIZES, max_dates=3, shard_samples=2
    )
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in whole["shards"]]
    assert (
        m["statistics"]["modalities"]["s2"]["B04"]["count"]
        == whole["statistics"]["modalities"]["s2"]["B04"]["count"]
    )
