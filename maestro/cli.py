"""The `maestro` console script: one entry point, one subcommand per job.

Each command module exposes `register(subparsers)`, which adds its parser and sets `func` to a
callable taking the parsed arguments and returning an exit code. Modules import their heavy
dependencies inside `func`; the benchmark modules, which import torch at the top, are imported
only for `maestro bench ...`, so `maestro --help` stays fast. A `MaestroError` becomes one line
on stderr (the last line of the output) and exit code 2.

This is the top of the layers: it names command modules of every layer (`cluster.cli` included)
by string and imports them only here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from maestro.errors import MaestroError

# Modules that add top-level commands (`maestro NAME ...`) and `maestro bench NAME ...` commands.
COMMAND_MODULES = ["maestro.cli_info", "maestro.cli_config", "shards.cli", "cluster.cli", "cluster.eval_cli"]
BENCH_MODULES: list[str] = ["maestro.data.bench", "maestro.data.bench_plan", "maestro.train.bench"]
BENCH = "bench"


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; `argv` (default: the command line) decides whether the bench modules load."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="maestro", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    if BENCH_MODULES:
        bench = sub.add_parser(BENCH, help="throughput benchmarks (data loader, training step)")
        bench_sub = bench.add_subparsers(dest="bench_command", required=True)
        if BENCH in argv:
            for name in BENCH_MODULES:
                importlib.import_module(name).register(bench_sub)
    return parser


def print_json(obj: object) -> None:
    """Print one JSON object as the last line of a command's output (the `--json` contract)."""
    print(json.dumps(obj, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MaestroError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
