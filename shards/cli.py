"""`maestro shards {synth,convert,inspect,verify,index,bench}`: build, describe and check shard splits."""

from __future__ import annotations

import argparse
import sys
import time

from shards.layouts import LAYOUTS


def _size(text: str) -> int:
    """Bytes from '256MB', '1.5GB', '300kB' or a plain number."""
    units = {"kb": 2**10, "mb": 2**20, "gb": 2**30, "b": 1}
    t = text.strip().lower()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def _writer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-size", type=_size, default="256MB", help="target shard size (default 256MB)")
    p.add_argument("--shard-samples", type=int, default=None, help="at most this many samples per shard")
    p.add_argument(
        "--workers", type=int, default=1, help="reader processes, or Ray CPUs with --ray (default 1)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing split")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none when stderr is not a terminal)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument(
        "--ray",
        action="store_true",
        help="write the split as Ray tasks, one per shard (a local Ray of --workers CPUs, or --address); "
        "a rerun after an interruption writes only the missing shards",
    )
    p.add_argument(
        "--address",
        default="",
        help="Ray cluster address (e.g. auto); implies --ray. Default: --config's run.address, else a local Ray",
    )


def _progress(args: argparse.Namespace) -> bool:
    """A progress bar only on a terminal: redirected logs get no ANSI codes or carriage returns."""
    return not args.no_progress and sys.stderr.isatty()


def _ray(args: argparse.Namespace) -> str | None:
    """The Ray address to fan out to ("" = a local Ray), or None to write in this process.

    Without --address, a --config's `run.address` is the cluster to use."""
    if not (args.ray or args.address):
        return None
    if not args.address and getattr(args, "config", None):
        from maestro.config import load

        return load(args.config).run.address
    return args.address


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="write, convert, inspect and verify WebDataset shard splits")
    s = p.add_subparsers(dest="shards_command", required=True)

    q = s.add_parser("synth", help="write a synthetic archive with a preset's modalities, sizes and dates")
    q.add_argument(
        "out", help="output root (local folder or s3://bucket/prefix); the split goes to OUT/SPLIT"
    )
    q.add_argument("--preset", default="treesatai_ts", help="dataset preset (default treesatai_ts)")
    q.add_argument("--samples", type=int, default=100)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--split", default="train")
    q.add_argument("--max-dates", type=int, default=None, help="cap dates per series (smaller archives)")
    q.add_argument(
        "--layout",
        choices=["shards", "source"],
        default="shards",
        help="'source': the archive's own file layout instead of shards (treesatai_ts only)",
    )
    _writer_args(q)
    q.set_defaults(func=run_synth)

    q = s.add_parser(
        "convert",
        help="convert a source archive to shard splits OUT/SPLIT",
        description="Convert a source archive to shard splits OUT/SPLIT. "
        "`maestro shards convert DATASET --help` shows the folder layout DATASET reads.",
    )
    c = q.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name, layout in LAYOUTS.items():
        d = c.add_parser(
            name,
            help=layout.splitlines()[0].rstrip(":"),
            description=f"Convert {layout.splitlines()[0].rstrip(':')} to shard splits OUT/SPLIT.",
            epilog="layout read:\n" + "\n".join(layout.splitlines()[1:]),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        d.add_argument("root", help="root folder of the source archive (see the layout below)")
        d.add_argument("out", help="output root (local folder or s3://bucket/prefix)")
        d.add_argument("--split", action="append", dest="splits", help="only this split (repeatable)")
        d.add_argument(
            "--skip-bad", action="store_true", help="skip unreadable samples, listing them in the manifest"
        )
        d.add_argument(
            "--config",
            required=name == "folder",
            default=None,
            help="YAML config whose data.modalities / data.inputs the samples hold"
            if name == "folder"
            else argparse.SUPPRESS,
        )
        _writer_args(d)
        d.set_defaults(func=run_convert)

    q = s.add_parser("inspect", help="manifest summary, shapes, dtypes, dates, band statistics of a split")
    q.add_argument("url", help="split URL (folder or s3:// prefix holding manifest.json)")
    q.add_argument("--max-samples", type=int, default=None, help="read at most this many samples")
    q.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    q.set_defaults(func=run_inspect)

    q = s.add_parser("verify", help="re-read every shard; check counts, sizes, sha256 and the sample schema")
    q.add_argument("url", help="split URL (folder or s3:// prefix holding manifest.json)")
    q.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    q.set_defaults(func=run_verify)

    q = s.add_parser("index", help="write the indexes and manifest of existing WebDataset tar shards")
    q.add_argument("url", help="split URL (folder or s3:// prefix holding the .tar shards)")
    q.add_argument("--config", required=True, help="config whose data.modalities the shards hold")
    q.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    q.add_argument("--overwrite", action="store_true", help="replace an existing manifest")
    q.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    q.set_defaults(func=run_index)

    q = s.add_parser("bench", help="conversion throughput (samples/s, MB/s) on a synthetic archive")
    q.add_argument("out", help="scratch output root (local or s3://); overwritten")
    q.add_argument("--preset", default="treesatai_ts")
    q.add_argument("--samples", type=int, default=200)
    q.add_argument("--workers", type=int, default=1)
    q.add_argument(
        "--ray",
        action="store_true",
        help="synth as Ray tasks on a local Ray of 1 CPU, then of --workers CPUs (Ray start-up not timed)",
    )
    q.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    q.set_defaults(func=run_bench)


def _throughput(samples: int, nbytes: int, seconds: float) -> dict:
    return {
        "samples": samples,
        "bytes": nbytes,
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 2),
        "mb_per_s": round(nbytes / 2**20 / seconds, 2),
    }


def _report(args: argparse.Namespace, rep: dict, text: str) -> None:
    from maestro.cli import print_json

    print(text)
    if args.json:
        print_json(rep)


def run_synth(args: argparse.Namespace) -> int:
    from maestro import storage
    from shards.synth import write_synthetic

    start = time.perf_counter()
    if args.layout == "source":
        from maestro.errors import DataError
        from shards.synth_source import write_treesatai_source

        if args.preset != "treesatai_ts":
            raise DataError(f"--layout source exists for --preset treesatai_ts only, not {args.preset!r}")
        n = write_treesatai_source(
            args.out,
            args.samples,
            args.seed,
            split=args.split,
            max_dates=args.max_dates,
            overwrite=args.overwrite,
        )
        rep = {
            "out": args.out,
            "layout": "source",
            **_throughput(args.samples, n, time.perf_counter() - start),
        }
        _report(args, rep, f"wrote {args.samples} samples in the TreeSatAI-TS layout to {args.out}")
        return 0
    m = write_synthetic(
        args.out,
        args.preset,
        args.samples,
        args.seed,
        split=args.split,
        max_dates=args.max_dates,
        shard_bytes=args.shard_size,
        shard_samples=args.shard_samples,
        overwrite=args.overwrite,
        workers=args.workers,
        progress=_progress(args),
        ray=_ray(args),
    )
    rep = {"url": storage.join(args.out, args.split), "shards": len(m["shards"])}
    rep.update(_throughput(m["samples"], m["bytes"], time.perf_counter() - start))
    text = f"{rep['url']}: {m['samples']} samples, {rep['shards']} shards, {rep['samples_per_s']} samples/s, {rep['mb_per_s']} MB/s"
    _report(args, rep, text)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from shards.convert import convert

    start = time.perf_counter()
    out = convert(
        args.dataset,
        args.root,
        args.out,
        splits=args.splits,
        config=args.config,
        workers=args.workers,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        shard_bytes=args.shard_size,
        shard_samples=args.shard_samples,
        progress=_progress(args),
        ray=_ray(args),
    )
    seconds = time.perf_counter() - start
    splits = {
        s: {"samples": m["samples"], "shards": len(m["shards"]), "skipped": m["skipped"]}
        for s, m in out.items()
    }
    rep = {"out": args.out, "splits": splits}
    rep.update(
        _throughput(sum(m["samples"] for m in out.values()), sum(m["bytes"] for m in out.values()), seconds)
    )
    lines = [
        f"{args.out}/{s}: {v['samples']} samples, {v['shards']} shards, {len(v['skipped'])} skipped"
        for s, v in splits.items()
    ]
    lines.append(f"{rep['samples_per_s']} samples/s, {rep['mb_per_s']} MB/s")
    _report(args, rep, "\n".join(lines))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from shards.inspect import format_report, inspect

    rep = inspect(args.url, args.max_samples)
    _report(args, rep, format_report(rep))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from shards.verify import verify

    rep = verify(args.url)
    for problem in rep["problems"]:
        print(f"FAIL {problem}", file=sys.stderr)
    status = "OK" if rep["ok"] else f"FAILED ({len(rep['problems'])} problems)"
    _report(args, rep, f"{args.url}: {rep['shards']} shards, {rep['samples']} samples: {status}")
    return 0 if rep["ok"] else 1


def run_index(args: argparse.Namespace) -> int:
    from shards.indexing import run

    return run(args)


def run_bench(args: argparse.Namespace) -> int:
    import tempfile

    from maestro import storage
    from shards.convert import convert
    from shards.synth import write_synthetic
    from shards.synth_source import write_treesatai_source

    rep = {"preset": args.preset, "workers": args.workers}
    if args.ray:
        return _bench_ray(args, rep)
    start = time.perf_counter()
    m = write_synthetic(
        args.out, args.preset, args.samples, 0, split="bench", overwrite=True, workers=args.workers
    )
    rep["synth"] = _throughput(m["samples"], m["bytes"], time.perf_counter() - start)
    lines = [
        f"synth {args.preset}: {rep['synth']['samples_per_s']} samples/s, {rep['synth']['mb_per_s']} MB/s"
    ]
    if args.preset == "treesatai_ts":
        with tempfile.TemporaryDirectory() as src:  # a source archive is local files
            write_treesatai_source(src, args.samples, 0, split="train", overwrite=True)
            start = time.perf_counter()
            dest = storage.join(args.out, "converted")
            out = convert("treesatai_ts", src, dest, overwrite=True, workers=args.workers)
        m = out["train"]
        rep["convert"] = _throughput(m["samples"], m["bytes"], time.perf_counter() - start)
        lines.append(
            f"convert treesatai_ts: {rep['convert']['samples_per_s']} samples/s, {rep['convert']['mb_per_s']} MB/s"
        )
    _report(args, rep, "\n".join(lines))
    return 0


def _warm() -> None:
    """Start a Ray worker and import the synthesis code there (held briefly, so each CPU gets one)."""
    import shards.synth  # noqa: F401

    time.sleep(1.0)


def _bench_ray(args: argparse.Namespace, rep: dict) -> int:
    """Synthesis as Ray tasks with 1 CPU and with `--workers` CPUs, side by side on the same items."""
    import ray

    from shards.fanout import ray_session
    from shards.synth import write_synthetic

    warm = ray.remote(num_cpus=1)(_warm)
    per_shard = max(1, args.samples // (4 * args.workers))  # enough parts to keep every CPU busy
    lines = []
    for cpus in sorted({1, args.workers}):
        with ray_session("", cpus):
            ray.get([warm.remote() for _ in range(cpus)])  # worker start-up and imports, untimed
            start = time.perf_counter()
            m = write_synthetic(
                args.out,
                args.preset,
                args.samples,
                0,
                split="bench",
                overwrite=True,
                shard_samples=per_shard,
                ray="",
            )
            rep[f"ray_{cpus}"] = _throughput(m["samples"], m["bytes"], time.perf_counter() - start)
        lines.append(
            f"synth {args.preset} on Ray, {cpus} CPU: {rep[f'ray_{cpus}']['samples_per_s']} samples/s"
        )
    if args.workers > 1:
        rep["speedup"] = round(rep[f"ray_{args.workers}"]["samples_per_s"] / rep["ray_1"]["samples_per_s"], 2)
        lines.append(f"{args.workers} vs 1 CPU: x{rep['speedup']}")
    _report(args, rep, "\n".join(lines))
    return 0
