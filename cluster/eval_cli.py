"""`maestro probe|finetune|evaluate|embed|export CONFIG [key=value ...]`: the downstream commands.

`probe` and `finetune` run one phase through Ray Train (`cluster.launch`) as `RUN/PHASE`;
`evaluate` chains pretrain → probe → fine-tune as the reference's `main.py` (pretraining is
skipped when `model.init` names weights), its launches on one Ray (`cluster.launch.one_ray`).
A rerun resumes an interrupted phase from its newest complete checkpoint; a phase with a results
file is not run again.
`embed` writes per-sample embeddings to GeoParquet; `export` the encoder alone as safetensors.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from maestro.cli_info import add_config_arguments


def register(sub: argparse._SubParsersAction) -> None:
    for phase, text in (
        ("probe", "train the heads on a frozen encoder (the reference's probe) and score val/test"),
        ("finetune", "fine-tune encoder and heads (EMA, early stopping) and score val/test"),
        ("evaluate", "pretrain, probe and fine-tune in a row (resumable by run name)"),
    ):
        p = sub.add_parser(phase, help=text)
        add_config_arguments(p)
        p.add_argument("--json", action="store_true", help="print the results as one JSON object")
        p.set_defaults(func=functools.partial(run_phases, phase=phase))
    p = sub.add_parser("embed", help="write per-sample embeddings with footprints to GeoParquet")
    _config_and_out(p, "output folder (local or s3://): one Parquet file per shard")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--tokens", action="store_true", help="also write every token of every modality")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_embed)
    p = sub.add_parser("export", help="write the encoder alone as safetensors (a backbone elsewhere)")
    _config_and_out(p, "output .safetensors file")
    p.set_defaults(func=run_export)


def _config_and_out(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("config", help="YAML config (deltas from the defaults)")
    p.add_argument("args", nargs="+", metavar="key=value|OUT", help=f"overrides and OUT, the {out}")


def _overrides_and_out(args: argparse.Namespace) -> tuple[list[str], str]:
    from maestro.errors import ConfigError

    outs = [a for a in args.args if "=" not in a]
    if len(outs) != 1:
        raise ConfigError("OUT", outs, "one output path among the arguments (the others section.key=value)")
    return [a for a in args.args if "=" in a], outs[0]


def _phase(cfg: Any, phase: str) -> dict[str, Any]:
    from cluster.launch import launch
    from maestro.eval.phase import RESULTS, changeable, finished, phase_config, worker_entry
    from maestro.train import resume
    from maestro.train.loop import run_url

    pcfg = phase_config(cfg, phase)
    url = run_url(pcfg)
    done = finished(pcfg, phase)
    if done is not None:
        print(f"{phase}: already done ({url}/{RESULTS}); not run again", flush=True)
        return done
    # A resume the phase's checkpoint refuses stops before any worker starts.
    for note in resume.check_config(pcfg, url, changeable(phase)):
        print(f"{phase}: resuming with a changed setting: {note}", flush=True)
    print(banner(cfg, pcfg, phase), flush=True)
    return launch(pcfg, train_fn=functools.partial(worker_entry, phase=phase))


def banner(cfg: Any, pcfg: Any, phase: str) -> str:
    """What phase config `pcfg` (of `cfg`) runs: steps, weights, folder, and `resume.what_runs`
    (a resumed phase keeps its checkpoint's ZeRO stage; phases run at most `MAX_STAGE`)."""
    from maestro.eval.phase import MAX_STAGE
    from maestro.train import resume
    from maestro.train.loop import run_url

    url = run_url(pcfg)
    runs = resume.what_runs(pcfg, url)
    capped = ""
    if cfg.train.zero_stage > MAX_STAGE:
        capped = f" (train.zero_stage={cfg.train.zero_stage}: phases run at most ZeRO-{MAX_STAGE}, README 'Evaluation')"
    return (
        f"{phase}: {pcfg.train.steps} steps from {pcfg.model.init} -> {url}; ZeRO stage {runs['stage']}{capped}, "
        f"{runs['precision']}, {runs['optimizer']}, global batch {runs['global_batch']}, {runs['workers']} worker(s)"
    )


def pretrained(cfg: Any) -> dict[str, Any] | None:
    """The summary of `cfg`'s pretraining run if it has finished (its newest complete checkpoint
    and its summary at `train.steps`), else None: `evaluate` then starts no worker group for it."""
    import json

    from maestro import storage
    from maestro.train import checkpoint
    from maestro.train.loop import SUMMARY_FILE, run_url

    url = run_url(cfg)
    summary_url = storage.join(url, SUMMARY_FILE)
    if checkpoint.CheckpointStore(url, cfg.train.keep_checkpoints).latest() != cfg.train.steps:
        return None
    if not storage.exists(summary_url):
        return None
    summary = json.loads(storage.read_bytes(summary_url))
    if summary.get("step") != cfg.train.steps or summary.get("stopped"):
        return None
    print(f"pretrain: already done ({url}, step {cfg.train.steps}); not run again", flush=True)
    return summary


def run_phases(args: argparse.Namespace, phase: str) -> int:
    from maestro import config
    from maestro.cli import print_json
    from maestro.train import preflight

    cfg = config.load(args.config, args.overrides)
    out: dict[str, Any] = {}
    if phase == "evaluate":
        from cluster.launch import launch, one_ray

        with one_ray():  # one Ray start for the chain, none when every phase is done
            if not cfg.model.init:
                preflight.check(cfg)  # a refused resume (say, more train.steps) stops here
                out["pretrain"] = pretrained(cfg) or launch(cfg)
            for p in ("probe", "finetune"):
                out[p] = _phase(cfg, p)
    else:
        out[phase] = _phase(cfg, phase)
    if args.json:
        print_json(out)
    for name, res in out.items():
        if "test" in res:
            scores = ", ".join(f"{k} {v:.4f}" for k, v in res["test"].items())
            print(f"{name} test: {scores}")
    return 0


def run_embed(args: argparse.Namespace) -> int:
    from maestro import config
    from maestro.eval.embed import embed_split

    overrides, out = _overrides_and_out(args)
    cfg = config.load(args.config, overrides)
    rep = embed_split(cfg, args.split, out, tokens=args.tokens, progress=not args.no_progress)
    print(f"embedded {rep['items']} items of {rep['split']} into {rep['out']} ({rep['files']} files)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from maestro import config
    from maestro.eval.export import export_encoder

    overrides, out = _overrides_and_out(args)
    cfg = config.load(args.config, overrides)
    rep = export_encoder(cfg, out)
    print(f"wrote the encoder ({rep['parameters']} parameters) from {rep['init']} to {rep['out']}")
    return 0
