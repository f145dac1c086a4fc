"""`maestro pretrain CONFIG [key=value ...] [--json]`: pretraining through Ray Train; resumes by run name."""

from __future__ import annotations

import argparse

from maestro.cli_info import add_config_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain through Ray Train (resumes a run of the same name)")
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="print the final summary as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.launch import launch
    from maestro import config
    from maestro.cli import print_json
    from maestro.train import preflight
    from maestro.train.loop import run_url

    cfg = config.load(args.config, args.overrides)
    preflight.check(cfg)
    d = cfg.derived
    print(
        f"run {run_url(cfg)}: {cfg.model.size} on {cfg.run.workers} worker(s), ZeRO {cfg.train.zero_stage}, "
        f"global batch {d.global_batch}, lr {d.lr:.3g}, {cfg.train.steps} steps",
        flush=True,
    )
    summary = launch(cfg)
    if args.json:
        print_json(summary)
    else:
        state = "stopped" if summary["stopped"] else "finished"
        print(
            f"{state} at step {summary['step']} (loss {summary['loss']:.4f}); "
            f"TensorBoard: tensorboard --logdir {summary['run']}/tensorboard"
        )
    return 0
