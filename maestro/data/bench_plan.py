"""`maestro bench plan --samples N [--shard-samples 1000 | --shards S] [--rank 3 --ranks 64 --workers 8] [--resume] [--json]`:
start-up cost of the loader's plan against the archive's size.

Writes a synthetic version-2 manifest of N/shard-samples shards (or S shards) with sparse
(truncated, empty) shard files of the listed sizes, so `load_shards` lists and checks the folder as
at rank 0's start (the other ranks skip the listing), then in a fresh process loads the shards,
builds the rank's plan and each worker's epoch order, and reports manifest bytes, the start-up seconds and resident memory (VmRSS)
before and after; then, again and one by one, the seconds of listing the folder (`storage.file_sizes`),
reading the manifest, `load_shards` (both, and the checks) and building the plan and orders.

With `--resume` it then times the two ways a loader starts mid-epoch, every reader of an old layout
(`--from-ranks` × `--from-workers`) halfway through its share of epoch 0: `resplit_s`, what
`Loader.resume` computes from the old ranks' positions (each old rank's consumed samples, kept for
this rank's draws, and each worker's epoch order with them), with the bytes the exclusions hold
and take in a stream state; and `resume_s`, a restart in the new layout from that state
(`load_state_dict`: the exclusions unpacked and each worker's epoch order).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, sys, time
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
url, rank, ranks, workers, old_ranks, old_workers = sys.argv[1], *map(int, sys.argv[2:7])
base = rss(); t = time.perf_counter()
from maestro.data.plan import Plan, load_shards
shards = load_shards(url)[1]  # (the manifest dropped, as the loader does)
plan = Plan(shards, seed=0, rank=rank, world_size=ranks, workers=workers, shuffle=True, shuffle_buffer=512)
loaded = rss()
orders = [plan.epoch_order(0, w) for w in range(workers)]
out = {"startup_s": time.perf_counter() - t, "rss_base": base, "rss_plan": loaded,
       "rss_per_worker": (rss() - loaded) / workers}
del orders
import dataclasses
from maestro import storage
from maestro.data.plan import consumed, held_bytes, merge, pack_excluded, unpack_excluded
from shards import manifest as manifest_io
t = time.perf_counter(); storage.file_sizes(url); out["list_s"] = time.perf_counter() - t
t = time.perf_counter(); manifest_io.read(url); out["manifest_s"] = time.perf_counter() - t
t = time.perf_counter(); load_shards(url); out["load_shards_s"] = time.perf_counter() - t
t = time.perf_counter()
plan = Plan(shards, seed=0, rank=rank, world_size=ranks, workers=workers, shuffle=True, shuffle_buffer=512)
orders = [plan.epoch_order(0, w) for w in range(workers)]
out["plan_s"] = time.perf_counter() - t
del orders
if old_ranks:
    olds = [dataclasses.replace(plan, rank=r, world_size=old_ranks, workers=old_workers) for r in range(old_ranks)]
    halfway = [[[0, len(p.epoch_order(0, w).emission) // 2, 0] for w in range(old_workers)] for p in olds]
    t = time.perf_counter()
    mine = {0: plan.shards_of(0)}
    taken = {}
    for old, positions in zip(olds, halfway):
        taken = merge(taken, consumed(old, positions, 0, mine))
    resplit = dataclasses.replace(plan, excluded=taken)
    orders = [resplit.epoch_order(0, w) for w in range(workers)]
    out["resplit_s"] = time.perf_counter() - t
    out["held_bytes"] = held_bytes(resplit)
    state = json.dumps({"0": pack_excluded(taken[0])})
    out["state_bytes"] = len(state)
    del orders
    t = time.perf_counter()
    excluded = {int(e): unpack_excluded(x) for e, x in json.loads(state).items()}
    same = dataclasses.replace(plan, excluded=excluded)
    orders = [same.epoch_order(0, w) for w in range(workers)]
    out["resume_s"] = time.perf_counter() - t
    out["rss_resumed"] = rss()
print(json.dumps(out))
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="loader plan start-up seconds and memory against the archive size")
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--shard-samples", type=int, default=1000)
    p.add_argument("--shards", type=int, default=0, help="this many shards (samples // shards each)")
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--resume", action="store_true", help="also time starting mid-epoch (see the docstring)")
    p.add_argument("--from-ranks", type=int, default=64, help="with --resume: the old layout's ranks")
    p.add_argument("--from-workers", type=int, default=4, help="with --resume: the old layout's workers")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from maestro.cli import print_json

    per_shard = args.samples // args.shards if args.shards else args.shard_samples
    with tempfile.TemporaryDirectory() as root:
        n = max(1, args.samples // per_shard)
        shards = []
        for i in range(n):
            name = f"bench-{i:06d}.tar"
            with open(Path(root) / name, "wb") as f:
                f.truncate(10240)
            idx = {"name": name.removesuffix(".tar") + ".index.json", "bytes": 0, "sha256": "0" * 64}
            shards.append(
                {"name": name, "samples": per_shard, "bytes": 10240, "sha256": "0" * 64, "index": idx}
            )
        manifest = {"format": "maestro-shards", "version": 2, "dataset": "bench", "split": "bench",
                    "source": "synthetic", "samples": n * per_shard, "bytes": 10240 * n,
                    "modalities": {}, "targets": {}, "statistics": {}, "shards": shards, "skipped": []}  # fmt: skip
        (Path(root) / "manifest.json").write_text(json.dumps(manifest, indent=1))
        old = [args.from_ranks, args.from_workers] if args.resume else [0, 0]
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, root, *map(str, [args.rank, args.ranks, args.workers, *old])],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        report = {"samples": n * per_shard, "shards": n, "rank": args.rank, "ranks": args.ranks,
                  "workers": args.workers, "manifest_bytes": (Path(root) / "manifest.json").stat().st_size,
                  **json.loads(out.stdout.strip().splitlines()[-1])}  # fmt: skip
        if args.resume:
            report["resumed_from"] = {"ranks": args.from_ranks, "workers": args.from_workers}
    print_json(report) if args.json else print(report)
    return 0
