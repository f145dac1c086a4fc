"""verify, inspect and the `maestro shards` commands, locally and on S3 (a moto server via s3fs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maestro import storage
from maestro.cli import main
from maestro.modalities import preset
from shards import manifest, reader
from shards.inspect import inspect
from shards.synth import SynthItem, read_item, write_synthetic
from shards.verify import verify
from shards.writer import ShardWriter, write_split

SMALL = {"aerial": 32}


@pytest.fixture
def split(tmp_path):
    write_synthetic(str(tmp_path), "treesatai_ts", 6, seed=1, sizes=SMALL, max_dates=10, shard_samples=2)
    return tmp_path / "train"


def test_verify_passes_on_good_shards(split):
    rep = verify(str(split))
    assert rep["ok"] and rep["problems"] == [] and rep["samples"] == 6 and rep["shards"] == 3


def test_verify_flipped_byte(split):
    path = split / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the first member's payload
    path.write_bytes(bytes(data))
    rep = verify(str(split))
    assert not rep["ok"] and any("train-000001.tar" in p and "sha256" in p for p in rep["problems"])
    assert all("train-000001.tar" in p for p in rep["problems"])


def test_verify_truncated_tar(split):
    path = split / "train-000002.tar"
    path.write_bytes(path.read_bytes()[:5000])
    rep = verify(str(split))
    assert not rep["ok"] and all("train-000002.tar" in p for p in rep["problems"])
    assert any("bytes" in p for p in rep["problems"])


def test_verify_missing_shard(split):
    (split / "train-000000.tar").unlink()
    rep = verify(str(split))
    assert rep["problems"] == ["shard 'train-000000.tar': missing (listed in the manifest)"]


def test_verify_wrong_shape_names_shard_and_sample(tmp_path):
    p = preset("treesatai_ts")
    items = [SynthItem("treesatai_ts", 0, i, "train", (("aerial", 32),), 8) for i in range(3)]

    def bad(it: SynthItem):
        s = read_item(it)
        if it.index == 2:
            s.arrays["aerial"] = s.arrays["aerial"][:, :3]  # 3 bands instead of 4
        return s

    w = ShardWriter(
        str(tmp_path), dataset="treesatai_ts", split="train", modalities=p.modalities, shard_samples=2
    )
    write_split(w, bad, items)
    rep = verify(str(tmp_path))
    key = read_item(items[2]).key
    assert len(rep["problems"]) == 1
    assert (
        "train-000001.tar" in rep["problems"][0]
        and key in rep["problems"][0]
        and "3 channels" in rep["problems"][0]
    )


def test_inspect_reports_modalities(split):
    rep = inspect(str(split))
    assert rep["samples"] == rep["samples_read"] == 6
    s2 = rep["modalities"]["s2"]
    assert s2["shapes"] == [["T", 10, 6, 6]] and s2["dtypes"] == ["float32"]
    assert s2["dates"]["per_sample"]["max"] <= 10 and s2["dates"]["first"] <= s2["dates"]["last"]
    assert 0 < s2["valid_fraction"] < 1 and s2["bands"]["B08"]["count"] > 0
    assert rep["modalities"]["aerial"]["shapes"] == [["T", 4, 32, 32]]


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_synth_inspect_verify_and_exit_codes(tmp_path, capsys):
    out = str(tmp_path / "ds")
    args = ["shards", "synth", out, "--samples", "4", "--max-dates", "6", "--shard-samples", "2", "--json"]
    assert main([*args, "--no-progress"]) == 0
    rep = _last_json(capsys)
    assert rep["samples"] == 4 and rep["samples_per_s"] > 0 and rep["mb_per_s"] > 0
    assert main([*args, "--no-progress"]) == 2  # refuses to overwrite
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["shards", "inspect", f"{out}/train", "--json"]) == 0
    assert _last_json(capsys)["modalities"]["aerial"]["shapes"] == [["T", 4, 304, 304]]
    assert main(["shards", "verify", f"{out}/train"]) == 0
    (tmp_path / "ds" / "train" / "train-000001.tar").unlink()
    assert main(["shards", "verify", f"{out}/train"]) == 1
    assert "FAIL shard 'train-000001.tar': missing" in capsys.readouterr().err


def test_cli_convert_and_bench(tmp_path, capsys, fixtures_dir):
    root = str(fixtures_dir / "treesatai_ts")
    assert (
        main(["shards", "convert", "treesatai_ts", root, str(tmp_path / "c"), "--no-progress", "--json"]) == 0
    )
    rep = _last_json(capsys)
    assert rep["samples"] == 6 and set(rep["splits"]) == {"train", "val", "test"}
    assert main(["shards", "bench", str(tmp_path / "b"), "--samples", "4", "--json"]) == 0
    rep = _last_json(capsys)
    assert rep["synth"]["samples"] == rep["convert"]["samples"] == 4 and rep["convert"]["mb_per_s"] > 0


def test_s3_synth_convert_inspect_verify(s3_bucket, fixtures_dir, capsys):
    url = f"s3://{s3_bucket}/synth"
    m = write_synthetic(url, "treesatai_ts", 4, seed=2, sizes=SMALL, max_dates=8, shard_samples=3)
    assert storage.list_names(f"{url}/train") == [
        "manifest.json",
        "train-000000.index.json",
        "train-000000.tar",
        "train-000001.index.json",
        "train-000001.tar",
    ]
    assert manifest.read(f"{url}/train")["shards"] == json.loads(json.dumps(m["shards"]))
    got = list(reader.iter_split(f"{url}/train"))
    for i, s in enumerate(got):
        want = read_item(SynthItem("treesatai_ts", 2, i, "train", (("aerial", 32),), 8))
        for mod in want.arrays:
            np.testing.assert_array_equal(s.arrays[mod], want.arrays[mod])
    assert len(got) == 4
    assert verify(f"{url}/train")["ok"]
    conv = f"s3://{s3_bucket}/treesat"
    root = str(fixtures_dir / "treesatai_ts")
    assert main(["shards", "convert", "treesatai_ts", root, conv, "--split", "val", "--no-progress"]) == 0
    assert main(["shards", "verify", f"{conv}/val"]) == 0
    assert main(["shards", "inspect", f"{conv}/val", "--json"]) == 0
    assert _last_json(capsys)["samples"] == 2
    # Refuses to overwrite on S3 too; a flipped byte on S3 is caught.
    assert main(["shards", "convert", "treesatai_ts", root, conv, "--split", "val", "--no-progress"]) == 2
    name = f"{conv}/val/val-000000.tar"
    data = bytearray(storage.read_bytes(name))
    data[900] ^= 1
    storage.write_bytes(name, bytes(data))
    assert not verify(f"{conv}/val")["ok"]
