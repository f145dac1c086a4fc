"""The loader over shards other than the writer's tidy ones: long keys, damaged samples and headers,
hostile members, bad values, old (version-1) splits, shards written by webdataset and indexed by
`maestro shards index`, and several splits streamed as one, with exact resume kept."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
import yaml
from conftest import assert_stream_resumes_exactly
from shard_cases import LONG_KEY, bad_values, refresh, samples, to_v1, write

from maestro import config
from maestro.cli import main
from maestro.data import build_loader
from maestro.errors import ConfigError
from shards import manifest, reader
from shards.index import read_index

AERIAL = {"aerial": {"resolution_m": 2.0, "image_size": 30, "patch_size": 10}}


def _cfg(shards, **data) -> config.Config:
    base = {"shards": shards, "batch_size": 1, "workers": 0, "shuffle_buffer": 0, "modalities": AERIAL}
    return config.from_dict({"data": {**base, **data}})


def epoch_keys(loader, epochs: int = 1) -> list[str] | list[list[str]]:
    """The sorted keys of the first epoch (of each of the first `epochs`); each must come once."""
    keys = [[] for _ in range(epochs)]
    for batch in loader:
        if batch["_epoch"] == epochs:
            assert all(len(k) == len(set(k)) for k in keys), keys
            return sorted(keys[0]) if epochs == 1 else [sorted(k) for k in keys]
        keys[batch["_epoch"]] += batch["_keys"]
    raise AssertionError("unreachable: the stream never ends")


def key_list(items, but=()) -> list[str]:
    return sorted(s.key for s in items if s.key not in but)


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_long_key_sample_trains(tmp_path):
    items = samples(4)
    items[2].key = LONG_KEY
    url = write(tmp_path, items)
    loader = build_loader(_cfg(url))
    assert epoch_keys(loader) == key_list(items) and loader.skipped_samples() == 0


def test_flipped_byte_skips_and_counts_that_sample_only(tmp_path):
    items = samples(6)
    url = write(tmp_path, items)
    index = read_index(f"{url}/train-000001.tar")
    _flip(Path(url) / "train-000001.tar", int(index.offsets[0]) + 3000)  # inside a sample's data
    loader = build_loader(_cfg(url))
    assert epoch_keys(loader) == key_list(items, but=[index.keys[0]])
    assert loader.skipped_samples() == 1


@pytest.mark.parametrize("indexed", [True, False], ids=["index", "no-index"])
def test_corrupt_header_loses_only_its_sample_every_epoch(tmp_path, indexed):
    items = samples(6)
    url = write(tmp_path, items)
    index = read_index(f"{url}/train-000000.tar")
    if not indexed:
        to_v1(url)
    _flip(Path(url) / "train-000000.tar", int(index.offsets[1]) + 1)
    loader = build_loader(_cfg(url))
    want = key_list(items, but=[index.keys[1]])
    assert epoch_keys(loader, 2) == [want, want] and loader.skipped_samples() == 2


def test_symlink_member_is_refused_and_the_rest_of_its_shard_trains(tmp_path):
    items = samples(6)
    url = write(tmp_path / "split", items)
    path = Path(url) / "train-000000.tar"
    key = items[1].key
    out = tmp_path / "x.tar"
    with tarfile.open(path) as a, tarfile.open(out, "w") as b:
        for info in a.getmembers():
            if info.name == f"{key}.aerial.npy":
                link = tarfile.TarInfo(info.name)
                link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
                b.addfile(link)
            else:
                b.addfile(info, a.extractfile(info))
    path.write_bytes(out.read_bytes())
    refresh(url)
    loader = build_loader(_cfg(url))
    assert epoch_keys(loader) == key_list(items, but=[key])
    assert loader.skipped_samples() == 1


def test_bad_values_are_skipped_and_counted_not_trained(tmp_path):
    items = samples(7)
    bad = bad_values(items)
    url = write(tmp_path, items)
    modalities = {**AERIAL, "s2": {}}
    loader = build_loader(_cfg(url, modalities=modalities))
    assert epoch_keys(loader) == key_list(items, but=bad)
    assert loader.skipped_samples() == len(bad) == 4


def test_version_1_split_streams_and_resumes_exactly(tmp_path):
    items = samples(7)
    url = write(tmp_path, items)
    to_v1(url)
    cfg = _cfg(url, batch_size=2, shuffle_buffer=4, workers=2)
    whole = build_loader(cfg)
    it = iter(whole)
    ref = [next(it)["_keys"] for _ in range(8)]
    first = build_loader(cfg)
    it = iter(first)
    assert [next(it)["_keys"] for _ in range(3)] == ref[:3]
    again = build_loader(cfg)
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))
    it = iter(again)
    assert [next(it)["_keys"] for _ in range(5)] == ref[3:]


def test_splits_listed_stream_as_one_and_resume_exactly(tmp_path):
    a = write(tmp_path / "fold1", samples(5, seed=1), shard_samples=2)
    b = write(tmp_path / "fold2", samples(4, seed=2), shard_samples=2)
    keys = {s.key for s in samples(5, seed=1)} | {s.key for s in samples(4, seed=2)}
    assert len(keys) == 9
    seen = []
    for rank in range(2):
        seen += epoch_keys(build_loader(_cfg([a, b], shuffle_buffer=3, workers=2), rank, 2))
    assert sorted(seen) == sorted(keys)
    assert_stream_resumes_exactly(_cfg([a, b], shuffle_buffer=3, workers=2), cut=5, total=12)
    with pytest.raises(ConfigError, match="data.shards"):
        _cfg([a, a])


def test_pastis_preset_streams_the_training_folds():
    cfg = config.load("configs/pastis_hd.yaml")
    assert [u.rsplit("/", 1)[-1] for u in cfg.data.shards] == ["fold1", "fold2", "fold3", "fold4"]


def test_webdataset_shards_indexed_by_maestro_train(tmp_path, capsys):
    items = samples(5)
    out = tmp_path / "wds"
    out.mkdir()
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=2, verbose=0) as sink:
        for s in items:
            sample = {"__key__": s.key, "meta.json": {"id": s.meta["id"]}}
            for mod, x in s.arrays.items():
                sample[f"{mod}.npy"], sample[f"{mod}.dates.npy"] = x, s.dates[mod]
                if mod in s.valid:
                    sample[f"{mod}.valid.npy"] = s.valid[mod]
            sink.write(sample)
    cfg_path = tmp_path / "own.yaml"
    cfg_path.write_text(yaml.safe_dump({"data": {"dataset": "treesatai_ts", "modalities": AERIAL}}))
    assert main(["shards", "index", str(out), "--config", str(cfg_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 5
    m = manifest.read(str(out))
    assert (
        m["version"] == 2 and len(m["shards"]) == 3 and set(m["statistics"]["modalities"]) >= {"aerial", "s2"}
    )
    for got, want in zip(reader.iter_split(str(out)), items, strict=True):
        assert got.key == want.key and all(
            (got.arrays[k] == want.arrays[k]).all() for k in ("aerial", "s1_asc")
        )
    loader = build_loader(_cfg(str(out)))
    assert epoch_keys(loader) == key_list(items) and loader.skipped_samples() == 0
    assert main(["shards", "verify", str(out)]) == 0
    assert main(["shards", "index", str(out), "--config", str(cfg_path)]) == 2  # a manifest exists
