"""The one tar reader and the shard index: the formats other tools write, long keys, the index and
manifest versions, and damaged tars read without losing more than the damaged sample."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from shard_cases import LONG_KEY, bad_values, refresh, samples, shard_members, to_v1, write

from maestro import config
from maestro.cli import main
from maestro.errors import DataError
from shards import manifest, reader
from shards.index import build_index, index_url, read_index
from shards.indexing import index_split
from shards.inspect import inspect
from shards.verify import verify


def test_long_key_is_written_with_a_pax_header_and_read_back(tmp_path):
    items = samples(3)
    items[1].key = LONG_KEY
    url = write(tmp_path, items)
    with tarfile.open(f"{url}/train-000000.tar") as tar:
        assert any(LONG_KEY in t.name and "path" in t.pax_headers for t in tar.getmembers())
    assert verify(url)["ok"]
    assert [s.key for s in reader.iter_split(url)] == [items[0].key, LONG_KEY, items[2].key]


@pytest.mark.parametrize("key", ["a.b", "dir/x", "", "é", "k" * 201])
def test_writer_refuses_a_bad_key_naming_it(tmp_path, key):
    s = samples(1)[0]
    s.key = key
    with pytest.raises(DataError, match="sample key") as e:
        write(tmp_path, [s])
    assert repr(key) in str(e.value)


def _rewrite(src: str, dst: Path, fmt: int) -> None:
    """Copy a split's shards member by member with `tarfile` in format `fmt` (no index kept)."""
    dst.mkdir()
    for shard in manifest.read(src)["shards"]:
        with (
            tarfile.open(f"{src}/{shard['name']}") as a,
            tarfile.open(dst / shard["name"], "w", format=fmt) as b,
        ):
            for info in a.getmembers():
                b.addfile(info, a.extractfile(info))


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_reader_reads_what_tarfile_writes(tmp_path, fmt):
    items = samples(4)
    if fmt != tarfile.USTAR_FORMAT:  # ustar cannot hold a 120-character basename
        items[2].key = LONG_KEY
    url = write(tmp_path / "a", items)
    _rewrite(url, tmp_path / "b", fmt)
    got = {}
    for name in sorted(p.name for p in (tmp_path / "b").glob("*.tar")):
        got.update(reader.read_samples(str(tmp_path / "b" / name)))
    assert got == shard_members(url)


def test_reader_reads_what_webdataset_writes_and_webdataset_reads_maestro(tmp_path):
    items = samples(5)
    items[3].key = LONG_KEY
    url = write(tmp_path / "a", items)
    mine = shard_members(url)
    shards = sorted(str(p) for p in Path(url).glob("*.tar"))
    theirs = {
        s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
        for s in wds.WebDataset(shards, shardshuffle=False)
    }
    assert theirs == mine  # webdataset reads maestro's shards sample for sample
    (tmp_path / "b").mkdir()
    with wds.ShardWriter(str(tmp_path / "b" / "train-%06d.tar"), maxcount=2, verbose=0) as sink:
        for key, members in mine.items():
            sink.write({"__key__": key, **members})
    got = {}
    for p in sorted((tmp_path / "b").glob("*.tar")):
        got.update(reader.read_samples(str(p)))
    assert got == mine


def test_index_holds_offsets_sizes_and_digests_of_each_sample(tmp_path):
    url = write(tmp_path, samples(4))
    shard = f"{url}/train-000000.tar"
    stored = read_index(shard)
    built = build_index(shard)
    assert stored.keys == built.keys and stored.digests == built.digests and stored.crcs == built.crcs
    body = Path(shard).read_bytes()
    for o, n, sha, crc in zip(stored.offsets, stored.sizes, stored.digests, stored.crcs):
        assert hashlib.sha256(body[o : o + n]).hexdigest() == sha and zlib.crc32(body[o : o + n]) == crc
    assert np.array_equal(stored.offsets, built.offsets) and np.array_equal(stored.sizes, built.sizes)
    assert stored.offsets[0] == 0 and np.array_equal(
        stored.offsets[1:], stored.offsets[:-1] + stored.sizes[:-1]
    )
    entry = manifest.read(url)["shards"][0]
    assert set(entry) == {"name", "samples", "bytes", "sha256", "index"}
    assert entry["index"]["name"] == "train-000000.index.json"
    doc = json.loads(Path(index_url(shard)).read_text())
    assert doc["format"] == "maestro-shard-index" and doc["shard"] == "train-000000.tar"
    assert [r[0] for r in doc["samples"]] == stored.keys


def test_version_1_index_still_reads_and_its_samples_are_checked_by_sha256(tmp_path):
    url = write(tmp_path, samples(3))
    shard = f"{url}/train-000000.tar"
    doc = json.loads(Path(index_url(shard)).read_text())
    doc["version"], doc["samples"] = 1, [r[:4] for r in doc["samples"]]
    Path(index_url(shard)).write_text(json.dumps(doc))
    index = read_index(shard)
    assert index.crcs is None and len(index.digests) == 3
    _flip(Path(shard), int(index.offsets[1]) + 2000)
    got = dict(reader.read_samples(shard))
    assert isinstance(got[index.keys[1]], DataError) and "sha256 of bytes" in str(got[index.keys[1]])
    assert all(isinstance(got[k], dict) for k in (index.keys[0], index.keys[2]))


def test_version_1_manifest_still_reads_and_verifies(tmp_path):
    items = samples(5)
    url = write(tmp_path, items)
    to_v1(url)
    m = manifest.read(url)
    assert m["version"] == 1 and m["shards"][0]["keys"] == [s.key for s in items[:3]]
    assert [s.key for s in reader.iter_split(url)] == [s.key for s in items]
    assert verify(url)["ok"]


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_fails_only_its_sample(tmp_path):
    url = write(tmp_path, samples(3))
    index = read_index(f"{url}/train-000000.tar")
    _flip(Path(url) / "train-000000.tar", int(index.offsets[1]) + 2000)
    got = dict(reader.read_samples(f"{url}/train-000000.tar"))
    assert isinstance(got[index.keys[1]], DataError) and "crc32 of bytes" in str(got[index.keys[1]])
    assert all(isinstance(got[k], dict) for k in (index.keys[0], index.keys[2]))


@pytest.mark.parametrize("indexed", [True, False], ids=["index", "no-index"])
def test_corrupt_header_costs_only_its_sample(tmp_path, indexed):
    url = write(tmp_path, samples(3))
    index = read_index(f"{url}/train-000000.tar")
    if not indexed:
        to_v1(url)
    _flip(Path(url) / "train-000000.tar", int(index.offsets[1]) + 1)  # the name field of its first header
    got = dict(reader.read_samples(f"{url}/train-000000.tar"))
    assert isinstance(got[index.keys[1]], DataError)
    assert "corrupt tar header" in str(got[index.keys[1]]) or "differs from the index" in str(
        got[index.keys[1]]
    )
    assert all(isinstance(got[k], dict) for k in (index.keys[0], index.keys[2]))
    assert verify(url)["problems"] and all(
        index.keys[1] in p or "sha256" in p for p in verify(url)["problems"]
    )


def test_symlink_member_is_refused_and_the_rest_is_read(tmp_path):
    url = write(tmp_path / "a", samples(3))
    key = read_index(f"{url}/train-000000.tar").keys[1]
    (tmp_path / "b").mkdir()
    with tarfile.open(f"{url}/train-000000.tar") as a, tarfile.open(tmp_path / "b" / "x.tar", "w") as b:
        for info in a.getmembers():
            if info.name == f"{key}.s2.npy":
                link = tarfile.TarInfo(info.name)
                link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
                b.addfile(link)
            else:
                b.addfile(info, a.extractfile(info))
    got = dict(reader.read_samples(str(tmp_path / "b" / "x.tar")))
    assert isinstance(got[key], DataError) and "not a regular file" in str(got[key])
    assert sum(isinstance(v, dict) for v in got.values()) == 2


def replace_member(url: str, shard: str, name: str, data: bytes) -> None:
    path = Path(url) / shard
    out = io.BytesIO()
    with tarfile.open(path) as a, tarfile.open(fileobj=out, mode="w") as b:
        for info in a.getmembers():
            body = a.extractfile(info).read()
            if info.name == name:
                body, info.size = data, len(data)
            b.addfile(info, io.BytesIO(body))
    path.write_bytes(out.getvalue())
    refresh(url)


def test_npy_header_whose_shape_overflows_is_a_clear_message(tmp_path, capsys):
    items = samples(2)
    url = write(tmp_path, items)
    head = b"{'descr': '|u1', 'fortran_order': False, 'shape': (9223372036854775807, 4, 34, 34), }"
    head += b" " * (-(len(head) + 11) % 64) + b"\n"
    forged = (
        b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + items[0].arrays["aerial"].tobytes()
    )
    replace_member(url, "train-000000.tar", f"{items[0].key}.aerial.npy", forged)
    rep = verify(url)
    assert (
        len(rep["problems"]) == 1
        and items[0].key in rep["problems"][0]
        and "aerial.npy" in rep["problems"][0]
    )
    assert main(["shards", "verify", url]) == 1
    assert main(["shards", "inspect", url]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count(items[0].key) == 2


@pytest.mark.parametrize("doc", [[], {"shards": None}], ids=["list", "null-shards"])
def test_manifest_of_the_wrong_shape_is_a_clear_message(tmp_path, capsys, doc):
    url = write(tmp_path, samples(2))
    path = Path(url) / "manifest.json"
    if isinstance(doc, dict):
        doc = {**json.loads(path.read_text()), **doc}
    path.write_text(json.dumps(doc))
    for command in ("verify", "inspect"):
        assert main(["shards", command, url]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "manifest.json" in err
    with pytest.raises(DataError, match="list|shards"):
        inspect(url)


def test_verify_names_each_sample_with_bad_values_and_no_good_one(tmp_path):
    items = samples(6)  # the first is the bad dtype: the check compares with the spec, not with it
    want = bad_values(items)
    rep = verify(write(tmp_path, items))
    assert len(rep["problems"]) == 4
    for key, words in want.items():
        assert any(key in p and words in p for p in rep["problems"]), (key, rep["problems"])


def test_index_of_bare_shards_gives_back_what_the_writer_wrote(tmp_path):
    url = write(tmp_path, samples(5))
    wrote = manifest.read(url)
    indexes = {s["name"]: read_index(f"{url}/{s['name']}") for s in wrote["shards"]}
    for p in Path(url).glob("*.json"):
        p.unlink()  # the bare tars, as another tool would leave them
    cfg = config.from_dict(
        {"data": {"dataset": "treesatai_ts", "modalities": {"aerial": {"image_size": 30, "patch_size": 10}}}}
    )
    got = index_split(url, cfg)
    assert got["shards"] == wrote["shards"]  # same bytes, digests, and index files byte for byte
    assert got["statistics"]["modalities"] == wrote["statistics"]["modalities"]
    for name, index in indexes.items():
        again = read_index(f"{url}/{name}")
        assert again.keys == index.keys and again.digests == index.digests
    with pytest.raises(DataError, match="already has a manifest"):
        index_split(url, cfg)


def test_reader_takes_directories_as_webdataset_does(tmp_path):
    url = write(tmp_path / "a", samples(3))
    mine = shard_members(url)
    path = tmp_path / "d.tar"
    with tarfile.open(f"{url}/train-000000.tar") as a, tarfile.open(path, "w") as b:
        folder = tarfile.TarInfo("tiles")
        folder.type = tarfile.DIRTYPE
        b.addfile(folder)  # as `tar` writes a folder
        for info in a.getmembers():
            body = a.extractfile(info)
            info.name = f"tiles/{info.name}"
            b.addfile(info, body)
    got = dict(reader.read_samples(str(path)))
    theirs = {s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False)}
    assert set(got) == theirs == {f"tiles/{k}" for k in list(mine)[:3]}
    assert all(got[f"tiles/{k}"] == mine[k] for k in list(mine)[:3])


def test_verify_names_a_missing_or_altered_index(tmp_path):
    url = write(tmp_path, samples(5))
    index = Path(index_url(f"{url}/train-000001.tar"))
    doc = json.loads(index.read_text())
    doc["samples"][0][3] = "0" * 64
    doc["samples"][1][4] ^= 1  # a crc32 the loader would refuse the sample for
    index.write_text(json.dumps(doc))
    problems = verify(url)["problems"]
    assert any("index 'train-000001.index.json' differs" in p for p in problems)
    assert any("sha256" in p and doc["samples"][0][0] in p for p in problems)
    assert any("crc32" in p and doc["samples"][1][0] in p for p in problems)
    assert all("train-000001" in p for p in problems)
    index.unlink()
    assert verify(url)["problems"] == [
        "shard 'train-000001.tar': its index 'train-000001.index.json' is missing; rebuild it with `maestro shards index SPLIT --config CONFIG --overwrite`"
    ]


def test_index_refuses_shards_without_the_configs_modality(tmp_path):
    url = write(tmp_path, samples(2))
    for p in Path(url).glob("*.json"):
        p.unlink()
    cfg = config.from_dict(
        {
            "data": {
                "dataset": "flair_hub",
                "inputs": ["aerial", "dem"],
                "modalities": {"aerial": {"image_size": 30, "patch_size": 10}},
            }
        }
    )
    with pytest.raises(DataError, match=r"no sample holds \['dem'\]"):
        index_split(url, cfg)
    assert not (Path(url) / "manifest.json").exists()


def _headers(fmt: int) -> list[bytes]:
    """Header blocks as tarfile writes them (extension headers included, their data left out): a
    file, a name that needs the ustar prefix or an extension, a directory, a non-ASCII name, a size
    beyond 11 octal digits and a link."""
    infos = [tarfile.TarInfo("k1.s2.npy"), tarfile.TarInfo("d" * 90 + "/" + "n" * 60 + ".npy"),
             tarfile.TarInfo("folder/"), tarfile.TarInfo("clé.json"), tarfile.TarInfo("big.npy"),
             tarfile.TarInfo("ln.npy")]  # fmt: skip
    infos[2].type, infos[4].size, infos[5].type, infos[5].linkname = (
        tarfile.DIRTYPE,
        3 * 2**33,
        tarfile.SYMTYPE,
        "x",
    )
    out = []
    for info in infos:
        if fmt == tarfile.USTAR_FORMAT and info.size >= 8**11:
            continue  # ustar cannot hold it
        buf, i = info.tobuf(fmt, "utf-8", "surrogateescape"), 0
        while i < len(buf):
            out.append(buf[i : i + 512])
            head = tarfile.TarInfo.frombuf(out[-1], "utf-8", "surrogateescape")
            i += 512 + (
                -(-head.size // 512) * 512
                if head.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE)
                else 0
            )
    return out


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_fast_header_parse_agrees_with_tarfile_and_leaves_the_rest_to_it(fmt):
    from shards.tar import _header

    blocks = _headers(fmt)
    assert len(blocks) >= 5
    for block in blocks:
        mine, theirs = _header(block), tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        assert (mine.name, mine.size, mine.type, mine.isdir()) == (
            theirs.name, theirs.size, theirs.type, theirs.isdir(),
        )  # fmt: skip
        bad = bytearray(block)
        bad[3] ^= 0x01  # a flipped bit in the name: the checksum no longer adds up
        with pytest.raises(tarfile.HeaderError):
            _header(bytes(bad))
    with pytest.raises(tarfile.EOFHeaderError):
        _header(bytes(512))
