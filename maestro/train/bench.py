"""`maestro bench step CONFIG [key=value ...] [--steps N] [--warmup W] [--json]`: training-step throughput.

One process, one device. First the framework's step (`loop.Stepper`: DeepSpeed engine at the
configured ZeRO stage and precision, EMA) on batches streamed live from `data.shards`, which gives
samples/s, tokens/s, MFU and the fraction of time spent waiting for data. Then the same model,
optimizer, schedule, masks and batches as a plain PyTorch loop without Ray or DeepSpeed. The
framework's overhead is `fraction_of_plain` = its samples/s without the data wait ÷ the plain
loop's (the plain loop reads the batches from memory); `fraction_of_plain_end_to_end` includes
the wait.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from maestro.cli_info import add_config_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("step", help="training-step throughput, tokens/s and MFU against a plain PyTorch loop")
    add_config_arguments(p)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=run)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _framework(cfg: Any, place: Any, steps: int, warmup: int) -> tuple[dict[str, float], list]:
    from maestro.data import build_loader
    from maestro.model import build_model
    from maestro.parallel.deepspeed import build_engine, local_shards
    from maestro.train import optim
    from maestro.train.loop import Stepper

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    opt = optim.build_optimizer(cfg, model)
    engine = build_engine(cfg, model, opt, optim.build_schedule(cfg, opt), 1, place.device.type == "cuda")
    ema = optim.EMA(local_shards(engine.module), cfg.train.ema_momentum) if cfg.train.ema else None
    stepper = Stepper(engine, ema, place.device, cfg.train.seed, 0)
    batches = iter(build_loader(cfg, 0, 1, train=True))
    recorded, wait, start = [], 0.0, 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(place.device)
            wait, start = 0.0, time.perf_counter()
        t = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.train.grad_accum)]
        wait += time.perf_counter() - t
        recorded.append(micro)
        stepper(step, micro)
    _sync(place.device)
    return {"seconds": time.perf_counter() - start, "data_wait_s": wait}, recorded


def _plain(cfg: Any, place: Any, recorded: list, warmup: int, dtype: torch.dtype) -> float:
    """The same work as a plain PyTorch loop; returns the seconds of the timed steps."""
    from maestro.model import build_model
    from maestro.train import optim
    from maestro.train.loop import mask_seed, to_device

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(place.device, dtype)
    opt = optim.build_optimizer(cfg, model)
    sched = optim.build_schedule(cfg, opt)
    generator = torch.Generator(device=place.device)
    accum = cfg.train.grad_accum
    start = 0.0
    for step, micro in enumerate(recorded):
        if step == warmup:
            _sync(place.device)
            start = time.perf_counter()
        for i, batch in enumerate(micro):
            generator.manual_seed(mask_seed(cfg.train.seed, step, 0, i))
            out = model(to_device(batch, place.device, dtype), generator=generator)
            (out.loss / accum).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    _sync(place.device)
    return time.perf_counter() - start


def bench_step(cfg: Any, steps: int, warmup: int) -> dict[str, Any]:
    from maestro import config
    from maestro.info import tokens
    from maestro.parallel import dist
    from maestro.train import metrics
    from maestro.train.loop import training_flops_per_sample

    cfg = config.from_dict(
        {k: v for k, v in cfg.to_dict().items() if k != "derived"},
        [f"train.steps={max(cfg.train.steps, warmup + steps)}"],
    )
    place = dist.init(config.uses_gpu(cfg))
    try:
        fw, recorded = _framework(cfg, place, steps, warmup)
        bf16 = config.deepspeed_config(cfg, 1, place.device.type == "cuda")["bf16"]["enabled"]
        plain_s = _plain(cfg, place, recorded, warmup, torch.bfloat16 if bf16 else torch.float32)
    finally:
        dist.shutdown()
    samples = steps * cfg.data.batch_size * cfg.train.grad_accum
    sps = samples / fw["seconds"]
    compute_sps = samples / (fw["seconds"] - fw["data_wait_s"])
    plain_sps = samples / plain_s
    flops = training_flops_per_sample(cfg)
    peak = metrics.peak_flops(place.device)
    return {
        "device": torch.cuda.get_device_name(place.device) if place.device.type == "cuda" else "cpu",
        "zero_stage": cfg.train.zero_stage,
        "precision": "bf16" if bf16 else "fp32",
        "steps": steps,
        "batch_size": cfg.data.batch_size * cfg.train.grad_accum,
        "samples_per_s": sps,
        "tokens_per_s": sps * tokens(cfg)["total"],
        "mfu": sps * flops / peak if flops and peak else None,
        "peak_flops": peak,
        "data_wait_frac": fw["data_wait_s"] / fw["seconds"],
        "step_time_s": fw["seconds"] / steps,
        "plain_samples_per_s": plain_sps,
        "fraction_of_plain": compute_sps / plain_sps,
        "fraction_of_plain_end_to_end": sps / plain_sps,
    }


def run(args: argparse.Namespace) -> int:
    from maestro import config
    from maestro.cli import print_json

    cfg = config.load(args.config, [*args.overrides, "run.workers=1"])
    rep = bench_step(cfg, args.steps, args.warmup)
    if args.json:
        print_json(rep)
    else:
        mfu = "n/a" if rep["mfu"] is None else f"{rep['mfu']:.2%}"
        print(
            f"{rep['device']} ZeRO {rep['zero_stage']} {rep['precision']}: {rep['samples_per_s']:.2f} samples/s, "
            f"{rep['tokens_per_s']:.0f} tokens/s, MFU {mfu}, data wait {rep['data_wait_frac']:.1%}; "
            f"plain PyTorch {rep['plain_samples_per_s']:.2f} samples/s; framework/plain "
            f"{rep['fraction_of_plain']:.3f} (end to end {rep['fraction_of_plain_end_to_end']:.3f})"
        )
    return 0
