"""The `maestro` console script: one entry point, one subcommand per job.

Each command module exposes `register(subparsers)`, which adds its parser and sets `func` to a
callable taking the parsed arguments and returning an exit code. Modules import their heavy
dependencies inside `func`, so `maestro --help` stays fast. A `MaestroError` becomes one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from maestro.errors import MaestroError

# Modules that add top-level commands (`maestro NAME ...`) and `maestro bench NAME ...` commands.
COMMAND_MODULES = ["maestro.cli_info", "shards.cli", "maestro.train.cli", "maestro.eval.cli"]
BENCH_MODULES: list[str] = ["maestro.data.bench", "maestro.train.bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maestro", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    if BENCH_MODULES:
        bench = sub.add_parser("bench", help="throughput benchmarks (data loader, training step)")
        bench_sub = bench.add_subparsers(dest="bench_command", required=True)
        for name in BENCH_MODULES:
            importlib.import_module(name).register(bench_sub)
    return parser


def print_json(obj: object) -> None:
    """Print one JSON object as the last line of a command's output (the `--json` contract)."""
    print(json.dumps(obj, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MaestroError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
