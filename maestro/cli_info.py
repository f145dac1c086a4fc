"""`maestro info CONFIG [key=value ...] [--json]`: tokens, parameters and FLOPs per sample."""

from __future__ import annotations

import argparse


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The CONFIG file and `section.key=value` overrides, shared by every config-driven command."""
    p.add_argument("config", help="YAML config (deltas from the defaults), e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="tokens per sample, parameters and FLOPs for a config")
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from maestro import config, info
    from maestro.cli import print_json

    cfg = config.load(args.config, args.overrides)
    rep = info.report(cfg)
    if args.json:
        print_json(rep)
    else:
        print(info.format_report(rep))
    return 0
