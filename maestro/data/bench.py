"""`maestro bench data URL [--workers N] [--batches K] [--simulate-pin] [--s3-latency-ms MS] [--source DIR [--only SIDE]] [--reader] [--json]`:
loader throughput.

Streams `K` batches from a shard split with `build_loader` and reports samples/s, MB/s (shard
bytes) and the decode and transform time per sample. With `--source DIR` (a TreeSatAI-TS archive
in its own layout: `{split}.csv`, `aerial/*.tif`, `sentinel-ts/*.h5`), it also reads the same
number of samples the reference's way, one sample at a time from its HDF5 and GeoTIFF files, through
the same date policy, scaling and collate, and reports the loader's speed-up per CPU core.
`--only loader` or `--only source` runs one side alone, so that each can be timed as a whole process.
`--simulate-pin` runs the pinned-memory path of a GPU run on CPU (torch's pin-memory thread, with
pinning a plain copy). `--s3-latency-ms MS` also streams the split from a local moto S3 server
behind a proxy adding MS per request and reports S3 against local disk in samples/s (needs
`moto[server]`; the server and proxy run in this process, so the S3 side's CPU-seconds include theirs).

`--reader` also times the shard read path alone, in this process: every sample of the split read
into its members by `shards.reader.read_samples` (index, seek, sha256, tar parse) and by the
sequential reader the loader had before the per-shard index (headers parsed by hand, no digests;
kept here as the baseline), alternating `--repeat` times, best of each, and their ratio.

Per core means per CPU-second consumed (this process and its data-loader workers), so the
figure holds on a busy machine where wall-clock rates swing with other jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

H5_SERIES = {"s2": "sen-2", "s1_asc": "sen-1-asc", "s1_des": "sen-1-des"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="loader throughput (samples/s, MB/s) against per-file source reads")
    p.add_argument("url", help="a shard split: local folder or s3://bucket/prefix")
    p.add_argument("--workers", type=int, default=2, help="data-loader worker processes")
    p.add_argument("--batches", type=int, default=20, help="batches to time (after one warm-up batch)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--source", help="the same TreeSatAI-TS archive in its source layout, for the baseline")
    p.add_argument("--split", default="train", help="the source split CSV to read (with --source)")
    p.add_argument("--only", choices=("loader", "source"), help="run one side alone (source: needs --source)")
    p.add_argument(
        "--simulate-pin",
        action="store_true",
        help="run the pinned-memory path on CPU (pinning a plain copy), as a GPU run does",
    )
    p.add_argument(
        "--s3-latency-ms",
        type=float,
        help="also stream the split from a local moto S3 server behind a proxy adding this "
        "latency per request, and report S3 against local disk",
    )
    p.add_argument(
        "--read-ahead", action="store_true", help="S3: read each worker's next shard ahead (data.read_ahead)"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="with --s3-latency-ms or --reader: best of N alternating runs of each side (for busy machines)",
    )
    p.add_argument(
        "--reader",
        action="store_true",
        help="also time the shard read path alone: the indexed reader against the old sequential one",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=run)


@contextlib.contextmanager
def simulated_pinning() -> Iterator[list[int]]:
    """Run the loader's pinned-memory path on a machine without an accelerator: torch's DataLoader
    sees one (and starts its pin-memory thread), and "pinning" a tensor or storage is a plain copy.
    Yields a list whose one element counts the pinned copies made (each buffer pinned is one)."""
    copies = [0]

    def pin(self: Any, device: Any = None) -> Any:
        copies[0] += 1
        return self.clone()

    patches = [
        (torch.accelerator, "is_available", lambda: True),
        (torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cpu")),
        (torch.accelerator, "current_device_index", lambda: 0),
        (torch.accelerator, "set_device_index", lambda index: None),
        (torch.cuda, "is_available", lambda: True),
        (torch.Tensor, "pin_memory", pin),
        (torch.UntypedStorage, "pin_memory", pin),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield copies
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _rates(samples: int, seconds: float, cpu_s: float, nbytes: float) -> dict[str, float]:
    return {
        "samples": samples,
        "seconds": seconds,
        "cpu_seconds": cpu_s,
        "samples_per_s": samples / seconds,
        "samples_per_cpu_s": samples / cpu_s,
        "mb_per_s": nbytes / 2**20 / seconds,
    }


def _product_dates(products: np.ndarray) -> np.ndarray:
    """(T, 3) int16 (year, day of year, 0) from Sentinel product names (field -5, as the reference)."""
    out = np.zeros((len(products), 3), np.int16)
    for i, p in enumerate(products):
        s = (p.decode() if isinstance(p, bytes) else p).split("_")[-5][:8]
        d = datetime.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
        out[i] = d.year, d.timetuple().tm_yday, 0
    return out


def read_source_sample(root: Path, row: dict[str, str]):
    """One TreeSatAI-TS sample from its source files (per-file reads, as the reference does)."""
    import h5py
    import tifffile

    from shards.schema import Sample

    aerial = tifffile.imread(root / "aerial" / row["aerial_name"])  # (H, W, C)
    day = datetime.date.fromisoformat(
        f"{row['aerial_date'][:4]}-{row['aerial_date'][4:6]}-{row['aerial_date'][6:8]}"
    )
    arrays = {"aerial": np.moveaxis(aerial, -1, 0)[None]}
    dates = {"aerial": np.array([[day.year, day.timetuple().tm_yday, 0]], np.int16)}
    valid = {}
    with h5py.File(root / "sentinel-ts" / row["sen_name"], "r") as f:
        for mod, name in H5_SERIES.items():
            arrays[mod] = f[f"{name}-data"][:]
            dates[mod] = _product_dates(f[f"{name}-products"][:])
        valid["s2"] = (f["sen-2-masks"][:] <= 0).all(axis=1).astype(np.uint8)
    key = Path(row["aerial_name"]).stem.replace(".", "_")
    return Sample(key, arrays, dates, valid)


def bench_source(cfg, root: Path, split: str, samples: int) -> dict[str, Any]:
    """Per-file reads of `samples` source samples through the loader's transforms, in one process."""
    from maestro.data.collate import collate_padded
    from maestro.data.prepare import Recipe, prepare

    with open(root / f"{split}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = (rows * (samples // len(rows) + 1))[:samples]
    recipe = Recipe.from_config(cfg, train=True)
    rng = np.random.default_rng(0)
    nbytes, items = 0, []
    start, cpu = time.perf_counter(), time.process_time()
    for row in rows:
        items += prepare(read_source_sample(root, row), recipe, rng, row["sen_name"])
        nbytes += (root / "aerial" / row["aerial_name"]).stat().st_size
        nbytes += (root / "sentinel-ts" / row["sen_name"]).stat().st_size
        if len(items) == cfg.data.batch_size:
            collate_padded(items, recipe.specs, list(recipe.targets))
            items = []
    return _rates(len(rows), time.perf_counter() - start, time.process_time() - cpu, nbytes)


def bench_decode(cfg, shard_url: str, limit: int = 64) -> dict[str, float]:
    """Mean decode and transform time per sample, in this process, over a shard's first samples.

    Transforms are the loader's per-sample ones (crop, dates, flips); its scaling happens in collate.
    """
    from maestro import storage
    from maestro.data.prepare import Recipe, select
    from shards.reader import read_samples
    from shards.schema import decode

    recipe = Recipe.from_config(cfg, train=True)
    rng = np.random.default_rng(0)
    t_decode = t_prepare = 0.0
    n = 0
    for key, members in read_samples(shard_url, lambda k: True, storage.open_file):
        t0 = time.perf_counter()
        sample = decode(key, members)
        t1 = time.perf_counter()
        select(sample, recipe, rng, key)
        t_decode, t_prepare = t_decode + t1 - t0, t_prepare + time.perf_counter() - t1
        n += 1
        if n == limit:
            break
    return {"decode_ms_per_sample": 1e3 * t_decode / n, "transform_ms_per_sample": 1e3 * t_prepare / n}


def bench_loader(cfg, batches: int) -> dict[str, Any]:
    from maestro.data import build_loader
    from shards import manifest as manifest_io

    manifest = manifest_io.read(cfg.data.shards)
    bytes_per_sample = manifest["bytes"] / manifest["samples"]
    children = _children_cpu_s()
    it = iter(build_loader(cfg))
    next(it)  # warm-up: worker start and first reads (their CPU counts: a conservative figure)
    start, cpu = time.perf_counter(), time.process_time()
    samples = sum(len(next(it)["_keys"]) for _ in range(batches))
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    it.close()  # stops and reaps the workers, so their CPU time shows in RUSAGE_CHILDREN
    cpu_s += _children_cpu_s() - children
    return {
        **_rates(samples, seconds, cpu_s, samples * bytes_per_sample),
        **bench_decode(cfg, f"{cfg.data.shards.rstrip('/')}/{manifest['shards'][0]['name']}"),
    }


def sequential_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every sample of a shard as the loader read it before the per-shard index (the baseline of
    `--reader`): one pass over the file, each ustar header parsed by hand, no digests."""
    from maestro import storage

    key, members = None, {}
    with storage.open_file(url) as f:
        while True:
            block = f.read(512)
            if len(block) < 512 or block == bytes(512):
                break
            if int(block[148:156].strip(b"\0 ") or b"0", 8) != sum(block) - sum(block[148:156]) + 256:
                raise ValueError(f"{url}: bad header checksum")
            name = block[:100].split(b"\0", 1)[0].decode()
            prefix = block[345:500].split(b"\0", 1)[0].decode()
            name = f"{prefix}/{name}" if prefix else name
            size = int(block[124:136].strip(b"\0 ") or b"0", 8)
            k, _, suffix = name.rsplit("/", 1)[-1].partition(".")
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            members[suffix] = f.read(size)
            f.seek(-size % 512, 1)
    if key is not None:
        yield key, members


def bench_reader(url: str, repeat: int) -> dict[str, Any]:
    """Samples per second reading every sample of the split `url` into its members, indexed
    (`read_samples`) against sequential (`sequential_samples`), alternating, best of `repeat`."""
    from maestro import storage
    from shards import manifest as manifest_io
    from shards.reader import read_samples

    shards = [storage.join(url, s["name"]) for s in manifest_io.read(url)["shards"]]
    sides = {"indexed": read_samples, "sequential": sequential_samples}
    best: dict[str, dict[str, float]] = {}
    for _ in range(repeat):
        for side, read in sides.items():
            start, cpu = time.perf_counter(), time.process_time()
            n = nbytes = 0
            for shard in shards:
                for _, members in read(shard):
                    n += 1
                    nbytes += sum(map(len, members.values()))
            rates = _rates(n, time.perf_counter() - start, time.process_time() - cpu, nbytes)
            best[side] = _faster(best.get(side), rates)
    return {
        **best,
        "indexed_vs_sequential": best["indexed"]["samples_per_s"] / best["sequential"]["samples_per_s"],
    }


def _faster(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    return a if a is not None and a["samples_per_s"] >= b["samples_per_s"] else b


@contextlib.contextmanager
def distant_copy(url: str, latency_ms: float) -> Iterator[str]:
    """The split at `url` copied into a moto S3 server on 127.0.0.1, reached through a proxy that
    adds `latency_ms` per request; yields its s3:// URL (the AWS_* environment points there meanwhile)."""
    import socket
    import uuid

    from moto.server import ThreadedMotoServer

    from maestro import storage
    from maestro.data.proxy import Proxy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench")  # fmt: skip
    storage._FS_CACHE.clear()
    proxy = None
    try:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        storage.filesystem("s3://x").mkdir(bucket)
        for name in storage.list_names(url):
            storage.write_bytes(f"s3://{bucket}/split/{name}", storage.read_bytes(storage.join(url, name)))
        proxy = Proxy(port, latency_s=latency_ms / 1e3)
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        storage._FS_CACHE.clear()
        yield f"s3://{bucket}/split"
    finally:
        if proxy is not None:
            proxy.down()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage._FS_CACHE.clear()


def run(args: argparse.Namespace) -> int:
    from maestro import config
    from maestro.cli import print_json
    from maestro.errors import ConfigError
    from shards import manifest as manifest_io

    dataset = manifest_io.read(args.url)["dataset"]
    data = {"dataset": dataset, "shards": args.url, "workers": args.workers, "batch_size": args.batch_size,
            "read_ahead": args.read_ahead}  # fmt: skip
    cfg = config.from_dict({"data": data})
    if args.only == "source" and not args.source:
        raise ConfigError("--only", "source", "--source DIR as well: the archive to read the reference's way")
    report: dict[str, Any] = {"url": args.url, "workers": args.workers, "batch_size": args.batch_size,
                              "host_cpus": os.cpu_count()}  # fmt: skip
    pinning = simulated_pinning if args.simulate_pin else contextlib.nullcontext
    report["pinning"] = (
        "simulated" if args.simulate_pin else ("cuda" if torch.cuda.is_available() else "none")
    )
    if args.only != "source":
        with pinning():
            report["loader"] = bench_loader(cfg, args.batches)
    if args.s3_latency_ms is not None and args.only != "source":
        s3 = None
        with distant_copy(args.url, args.s3_latency_ms) as s3_url, pinning():
            s3_cfg = config.from_dict({"data": {**data, "shards": s3_url}})
            for i in range(args.repeat):  # alternating, so both sides see the same machine load
                if i:
                    report["loader"] = _faster(report["loader"], bench_loader(cfg, args.batches))
                s3 = _faster(s3, bench_loader(s3_cfg, args.batches))
        report["s3"] = {"latency_ms": args.s3_latency_ms, "repeat": args.repeat, **s3}
        report["s3_vs_local"] = report["s3"]["samples_per_s"] / report["loader"]["samples_per_s"]
    if args.reader:
        report["reader"] = bench_reader(args.url, args.repeat)
    if args.source and args.only != "loader":
        samples = report["loader"]["samples"] if "loader" in report else args.batches * args.batch_size
        report["source"] = bench_source(cfg, Path(args.source), args.split, samples)
    if "loader" in report and "source" in report:
        src = report["source"]
        report["speedup"] = report["loader"]["samples_per_s"] / src["samples_per_s"]
        report["speedup_per_core"] = report["loader"]["samples_per_cpu_s"] / src["samples_per_cpu_s"]
    if args.json:
        print_json(report)
    else:
        for part in ("loader", "s3", "source"):
            if part in report:
                r = report[part]
                print(f"{part:>7}: {r['samples_per_s']:8.1f} samples/s  {r['mb_per_s']:8.1f} MB/s  "
                      f"{r['samples_per_cpu_s']:8.1f} samples per CPU-second")  # fmt: skip
        if "loader" in report:
            print(f"decode {report['loader']['decode_ms_per_sample']:.2f} ms/sample, "
                  f"transforms {report['loader']['transform_ms_per_sample']:.2f} ms/sample")  # fmt: skip
        if "reader" in report:
            r = report["reader"]
            print(f"read path: indexed {r['indexed']['samples_per_s']:.0f} samples/s, sequential (old) "
                  f"{r['sequential']['samples_per_s']:.0f}: {r['indexed_vs_sequential']:.2f}x")  # fmt: skip
        if "s3_vs_local" in report:
            print(
                f"S3 at {args.s3_latency_ms:g} ms per request vs local disk: {report['s3_vs_local']:.2f}x samples/s"
            )
        if "speedup_per_core" in report:
            print(f"loader vs per-file reads: {report['speedup_per_core']:.2f}x per CPU core")
    return 0
