"""`maestro config CONFIG [OVERLAY.yaml ...] [key=value ...] [--json]`: the full resolved configuration.

Every key with its value and where the value came from: `default` (maestro/config.py), `file
PATH` (the config or an overlay), `override` (the command line) or `derived` (computed by
`resolve()`: modality specs, global batch, learning rate, DeepSpeed config).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from maestro.cli_info import add_config_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="every resolved config key with its value and source")
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object {key: {value, source}}")
    p.set_defaults(func=run)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists and empty mappings stay values."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _set_by(flat: dict[str, Any], key: str) -> bool:
    """Whether a flat delta sets `key` or a mapping above it (`data.modalities.s2` sets its fields)."""
    return any(key == k or key.startswith(k + ".") for k in flat)


def sources(path: str | None, overrides: list[str]) -> dict[str, dict[str, Any]]:
    """`{key: {"value": v, "source": s}}` of the resolved config, in section order."""
    from maestro import config

    cfg = config.load(path, overrides)
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        layers.append((f"file {path}", flatten(config.read_delta(path))))
    for text in overrides:
        if config.is_overlay(text):
            layers.append((f"file {text}", flatten(config.read_delta(text))))
    pairs = [text.split("=", 1)[0].strip() for text in overrides if not config.is_overlay(text)]
    layers.append(("override", {k: None for k in pairs}))
    out = {}
    for key, value in flatten(cfg.to_dict()).items():
        source = "derived" if key.startswith("derived.") else "default"
        for name, flat in layers:
            if _set_by(flat, key):
                source = name
        out[key] = {"value": value, "source": source}
    return out


def run(args: argparse.Namespace) -> int:
    from maestro.cli import print_json

    table = sources(args.config, args.overrides)
    if args.json:
        print_json(table)
        return 0
    width = max(len(k) for k in table)
    for key, entry in table.items():
        print(f"{key:<{width}}  {json.dumps(entry['value'])}  ({entry['source']})")
    return 0
