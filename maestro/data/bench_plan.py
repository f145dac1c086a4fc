"""`maestro bench plan --samples N [--shard-samples 1000] [--rank 3 --ranks 64 --workers 8] [--json]`:
start-up cost of the loader's plan against the archive's size.

Writes a synthetic version-2 manifest of N/shard-samples shards with sparse (truncated, empty)
shard files of the listed sizes, so `load_shards` lists and checks the folder as at a real start,
then in a fresh process loads the shards, builds the rank's plan and each worker's epoch order, and
reports manifest bytes, seconds and resident memory (VmRSS) before and after.
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
url, rank, ranks, workers = sys.argv[1], *map(int, sys.argv[2:5])
base = rss(); t = time.perf_counter()
from maestro.data.plan import Plan, load_shards
_, shards = load_shards(url)
plan = Plan(shards, seed=0, rank=rank, world_size=ranks, workers=workers, shuffle=True, shuffle_buffer=512)
loaded = rss()
orders = [plan.epoch_order(0, w) for w in range(workers)]
print(json.dumps({"startup_s": time.perf_counter() - t, "rss_base": base, "rss_plan": loaded,
                  "rss_per_worker": (rss() - loaded) / workers}))
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="loader plan start-up seconds and memory against the archive size")
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--shard-samples", type=int, default=1000)
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from maestro.cli import print_json

    with tempfile.TemporaryDirectory() as root:
        n = max(1, args.samples // args.shard_samples)
        shards = []
        for i in range(n):
            name = f"bench-{i:06d}.tar"
            with open(Path(root) / name, "wb") as f:
                f.truncate(10240)
            idx = {"name": name.removesuffix(".tar") + ".index.json", "bytes": 0, "sha256": "0" * 64}
            shards.append(
                {
                    "name": name,
                    "samples": args.shard_samples,
                    "bytes": 10240,
                    "sha256": "0" * 64,
                    "index": idx,
                }
            )
        manifest = {"format": "maestro-shards", "version": 2, "dataset": "bench", "split": "bench",
                    "source": "synthetic", "samples": n * args.shard_samples, "bytes": 10240 * n,
                    "modalities": {}, "targets": {}, "statistics": {}, "shards": shards, "skipped": []}  # fmt: skip
        (Path(root) / "manifest.json").write_text(json.dumps(manifest, indent=1))
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, root, str(args.rank), str(args.ranks), str(args.workers)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        report = {"samples": n * args.shard_samples, "shards": n,
                  "manifest_bytes": (Path(root) / "manifest.json").stat().st_size,
                  **json.loads(out.stdout.strip().splitlines()[-1])}  # fmt: skip
    print_json(report) if args.json else print(report)
    return 0
