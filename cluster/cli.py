"""`maestro pretrain CONFIG [OVERLAY.yaml ...] [key=value ...] [--json]`: pretraining through Ray Train.

The command of the top layer (it may import `cluster/`): checks made before Ray starts
(`maestro.train.preflight`), a banner saying what runs and where the logs go, `launch`, and the
summary. A second run of the same name resumes.
"""

from __future__ import annotations

import argparse

from maestro.cli_info import add_config_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain through Ray Train (resumes a run of the same name)",
        description="Pretrain through Ray Train: local Ray by default, a Ray cluster with run.address. "
        "Add configs/local.yaml after a preset to run it on this machine (run.workers=auto). "
        "`maestro config CONFIG` lists every key.",
    )
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="print the final summary as one JSON object")
    p.set_defaults(func=run)


def banner(cfg, run_url: str) -> list[str]:
    """What runs: the run, the model, the workers and devices, the engine's stage and precision."""
    from maestro import config
    from maestro.train.resume import what_runs

    d, r = cfg.derived, cfg.run
    runs = what_runs(cfg, run_url)  # a resumed run keeps its checkpoint's stage
    device = "GPU" if config.uses_gpu(cfg) else "CPU"
    where = f"Ray cluster {r.address}" if r.address else "local Ray (127.0.0.1)"
    low, high = config.worker_range(cfg)
    workers = f"{high}" if low == high else f"{low} to {high} (elastic)"
    return [
        f"maestro pretrain: run {run_url}",
        f"  {cfg.model.size} model, {', '.join(d.modalities)}; {workers} {device} worker(s) on {where}",
        f"  ZeRO {runs['stage']}, {runs['precision']}, {runs['optimizer']}, global batch {runs['global_batch']}, "
        f"lr {d.lr:.3g}, {cfg.train.steps} steps",
        f"  logs: {run_url}/logs (driver.log, ray/), TensorBoard: {run_url}/tensorboard",
    ]


def skipped_line(skipped: dict | None) -> str:
    """The final line's account of skipped samples: how many, and why."""
    if not skipped or not skipped.get("total"):
        return "no sample skipped"
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped["reasons"].items()))
    return f"{skipped['total']} samples skipped ({why})"


def run(args: argparse.Namespace) -> int:
    from cluster.console import RunLog
    from maestro import config
    from maestro.cli import print_json

    cfg = config.load(args.config, args.overrides)
    log, url = RunLog(), ""
    try:
        with log:  # from here on, what the libraries print goes to the run's logs
            from cluster import resources
            from cluster.launch import launch
            from maestro.train import preflight
            from maestro.train.loop import run_url

            if not cfg.run.address:  # the machine first: what fits decides the rest
                resources.check_local(cfg)
            preflight.check(cfg)
            url = run_url(cfg)  # reachable: the logs go there from now on
            for line in banner(cfg, url):
                log.say(line)
            summary = launch(cfg, log=log)
            if not args.json:
                state = "stopped" if summary["stopped"] else "finished"
                log.say(
                    f"{state} at step {summary['step']} (loss {summary['loss']:.4f}); "
                    f"{skipped_line(summary.get('skipped'))}; "
                    f"TensorBoard: tensorboard --logdir {summary['run']}/tensorboard"
                )
    finally:
        if url:
            log.keep(url)
    if args.json:
        print_json(summary)
    return 0
