"""`maestro bench step CONFIG [key=value ...] [--steps N] [--warmup W] [--json]`: training-step throughput.

One process, one device (so the engine runs ZeRO stage 0: one rank has nothing to partition).
Each step, a batch is streamed live from `data.shards` and goes through the framework's step
(`loop.Stepper`: DeepSpeed engine, configured precision, EMA), which gives samples/s, tokens/s,
MFU (`mfu` end to end, `mfu_compute` without the data wait) and the fraction of time spent
waiting for data; then the same batch goes through the same model, optimizer, schedule, EMA and
masks as a plain PyTorch loop without Ray or DeepSpeed, in the same precision recipe as the
engine at stage 0 (fp32 weights stepped by the same AdamW, bf16 compute under autocast when the
run is bf16). The framework's overhead is `fraction_of_plain` = its samples/s without the data
wait ÷ the plain loop's; `fraction_of_plain_end_to_end` includes the wait.
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


class PlainLoop:
    """The same model, optimizer, schedule, EMA and masks as a plain PyTorch loop (no Ray, no
    DeepSpeed), in the engine's precision recipe at stage 0: fp32 weights, bf16 compute under
    autocast when `bf16`. The recipe's work is on both sides, so the ratio measures the framework."""

    def __init__(self, cfg: Any, device: torch.device, bf16: bool):
        from maestro.model import build_model
        from maestro.model.ema import EMA
        from maestro.train import optim

        torch.manual_seed(cfg.train.seed)
        self.cfg, self.device, self.bf16 = cfg, device, bf16
        self.model = build_model(cfg).to(device)
        self.opt = optim.build_optimizer(cfg, self.model)
        self.sched = optim.build_schedule(cfg, self.opt)
        self.ema = EMA(list(self.model.parameters()), cfg.train.ema_momentum) if cfg.train.ema else None
        self.generator = torch.Generator(device=device)

    def __call__(self, step: int, batches: list[dict[str, Any]]) -> list[Any]:
        from maestro.train.loop import mask_seed, to_device

        outs = []
        for i, batch in enumerate(batches):
            self.generator.manual_seed(mask_seed(self.cfg.train.seed, step, 0, i))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = self.model(to_device(batch, self.device), generator=self.generator)
            (out.loss / len(batches)).backward()
            outs.append(out)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return outs


def bench_step(cfg: Any, steps: int, warmup: int) -> dict[str, Any]:
    """Time the framework's step and the plain loop's, interleaved step by step on the same batches
    and in alternating order (so that load from other processes falls on both alike)."""
    from maestro import config
    from maestro.data import build_loader
    from maestro.info import tokens
    from maestro.model import build_model
    from maestro.model.ema import EMA
    from maestro.parallel import dist
    from maestro.parallel.deepspeed import build_engine, local_shards, optimizer_name, precision
    from maestro.train import metrics, optim
    from maestro.train.loop import Stepper, batch_counts, training_flops_per_sample

    cfg = config.from_dict(
        {k: v for k, v in cfg.to_dict().items() if k != "derived"},
        [f"train.steps={max(cfg.train.steps, warmup + steps)}"],
    )
    place = dist.init(config.uses_gpu(cfg))
    try:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg)
        opt = optim.build_optimizer(cfg, model)
        engine = build_engine(cfg, model, opt, optim.build_schedule(cfg, opt), 1, place.device.type == "cuda")
        ema = EMA(local_shards(engine.module), cfg.train.ema_momentum) if cfg.train.ema else None
        framework = Stepper(engine, ema, place.device, cfg.train.seed, 0)
        bf16 = precision(engine) == "bf16"
        plain = PlainLoop(cfg, place.device, bf16)
        batches = iter(build_loader(cfg, 0, 1, train=True))
        per_sample = tokens(cfg)["total"]
        fw_s = wait_s = plain_s = 0.0
        samples = n_tokens = 0
        for step in range(warmup + steps):
            timed = step >= warmup
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.train.grad_accum)]
            wait = time.perf_counter() - t0
            # Alternate which side runs first: the loader's workers prefetch right after a fetch,
            # so whichever side runs first shares the CPU with them.
            order = (framework, plain) if step % 2 == 0 else (plain, framework)
            took, outs = {}, {}
            for side in order:
                t = time.perf_counter()
                outs[side] = side(step, micro)
                _sync(place.device)
                took[side] = time.perf_counter() - t
            # Each side's loss of its last micro-batch (read after the timing: it syncs).
            losses = {side: float(outs[side][-1].loss.detach()) for side in order}
            if timed:
                wait_s, fw_s, plain_s = wait_s + wait, fw_s + wait + took[framework], plain_s + took[plain]
                for b in micro:
                    n, t = batch_counts(b, per_sample)
                    samples, n_tokens = samples + n, n_tokens + t
        stage, optimizer = engine.zero_optimization_stage(), optimizer_name(engine)
    finally:
        dist.shutdown()
    sps, compute_sps, plain_sps = samples / fw_s, samples / (fw_s - wait_s), samples / plain_s
    tps = n_tokens / fw_s
    flops_per_token = training_flops_per_sample(cfg) / per_sample
    peak = metrics.peak_flops(place.device)
    return {
        "device": torch.cuda.get_device_name(place.device) if place.device.type == "cuda" else "cpu",
        "zero_stage": stage,
        "precision": "bf16" if bf16 else "fp32",
        "optimizer": optimizer,
        "steps": steps,
        "batch_size": samples / steps,  # mean samples per optimizer step (packed batches vary)
        "samples_per_s": sps,
        "tokens_per_s": tps,
        "mfu": tps * flops_per_token / peak if peak else None,
        "mfu_compute": tps * (fw_s / (fw_s - wait_s)) * flops_per_token / peak if peak else None,
        "peak_flops": peak,
        "data_wait_frac": wait_s / fw_s,
        "step_time_s": fw_s / steps,
        "plain_samples_per_s": plain_sps,
        "loss": losses[framework],  # of the last step: the same recipe gives the same value
        "plain_loss": losses[plain],
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
        mfu = (
            "n/a"
            if rep["mfu"] is None
            else f"{rep['mfu']:.2%} ({rep['mfu_compute']:.2%} without the data wait)"
        )
        print(
            f"{rep['device']} ZeRO {rep['zero_stage']} {rep['precision']} {rep['optimizer']}: "
            f"{rep['samples_per_s']:.2f} samples/s, "
            f"{rep['tokens_per_s']:.0f} tokens/s, MFU {mfu}, data wait {rep['data_wait_frac']:.1%}; "
            f"plain PyTorch {rep['plain_samples_per_s']:.2f} samples/s; framework/plain "
            f"{rep['fraction_of_plain']:.3f} (end to end {rep['fraction_of_plain_end_to_end']:.3f})"
        )
    return 0
