"""Benchmark of the fused kernels against eager PyTorch and `torch.compile` of their references.

    python -m kernels.bench [--batch 32] [--runs 100] [--presets flair_hub,...] [--json]

For the TreeSatAI-TS, PASTIS-HD and FLAIR-HUB presets (shapes from the modality registry) it times
forward, backward and both with CUDA events (warm-up, then the median of `--runs`), on rotating input
copies that together exceed twice the L2 cache, and reports ms, GB/s of the bytes the fused kernel must
move (`kernels/traffic.py`: every load and store of the kernels and the torch calls around them),
and that as a percentage of the device's measured copy bandwidth. Each run appends its rows
(device, versions, commit) to `kernels/results.csv`. Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from kernels import group_norm_target as gnt
from kernels import masking, traffic
from kernels.group_norm_target import group_norm_masked_loss, group_norm_masked_loss_ref
from kernels.masking import gather_rows, gather_rows_ref, unmask_rows, unmask_rows_ref
from maestro import config, info
from maestro.sizes import SIZES

PRESETS = ("treesatai_ts", "pastis_hd", "flair_hub")
RESULTS = Path(__file__).with_name("results.csv")
FIELDS = [
    "date", "commit", "device", "torch", "triton", "cuda", "copy_gb_s", "preset", "op", "shape",
    "impl", "pass", "ms", "gb_s", "pct_copy",
]  # fmt: skip
MASK_RATIO = 0.75
INVALID = 0.05  # fraction of each patch's pixels marked invalid


@dataclass
class Case:
    """One benchmarked call: `make(device)` builds a fresh input set with exactly the counts (masked
    tokens, valid pixels, mask tokens used) that `bytes` (per pass, `kernels/traffic.py`) assumes;
    `run[impl]` the function, `grads` the inputs it differentiates."""

    preset: str
    op: str
    shape: str
    bytes: dict[str, int]  # pass -> bytes
    make: Callable[[str], tuple]
    run: dict[str, Callable]  # impl -> fn(*inputs) -> tensor to differentiate
    grads: tuple[int, ...]  # positions of the inputs that get gradients


def _loss_case(preset: str, name: str, spec, batch: int) -> Case:
    """The masked loss of one modality: M = B·T·g² patches of P = p² pixels × C bands, bf16
    predictions, float32 targets, 75 % of the tokens masked, 5 % of each patch's pixels invalid."""
    m, p, c = batch * spec.num_dates * spec.tokens_per_date, spec.patch_size**2, spec.channels
    groups = spec.norm_groups
    masked, valid_px = round(MASK_RATIO * m), p - round(INVALID * p)
    programs = triton.cdiv(m, gnt._blocks(m, p, c)["BLOCK_M"])

    def make(device: str) -> tuple:
        target = torch.randn(m, p, c, device=device)
        pred = torch.randn(m, p, c, device=device, dtype=torch.bfloat16, requires_grad=True)
        valid = torch.rand(m, p, device=device).argsort(1) < valid_px
        token_mask = torch.zeros(m, dtype=torch.bool, device=device)
        token_mask[torch.randperm(m, device=device)[:masked]] = True
        return pred, target, valid, token_mask

    def fn(op):
        return lambda pred, target, valid, token_mask: op(pred, target, groups, valid, token_mask, "l1")[0]

    return Case(
        preset, "group_norm_masked_loss", f"{name} M={m} P={p} C={c} groups={groups}",
        traffic.masked_loss(m, p, c, masked * valid_px, 2, 4, programs),
        make, {"triton": fn(group_norm_masked_loss), "eager": fn(group_norm_masked_loss_ref)}, (0,),
    )  # fmt: skip


def _masking_cases(preset: str, key: str, total: int, visible: int, batch: int) -> list[Case]:
    """Gather of a fusion group's visible tokens (encoder width) and its un-masking (decoder width)."""
    n, k = batch * total, batch * visible
    e, e_dec, tokens = SIZES["base"].dim, SIZES["base"].decoder_dim, 4

    def rows(device: str) -> tuple:
        keep = torch.rand(batch, total, device=device).argsort(1)[:, :visible].sort(1).values
        index = (keep + torch.arange(batch, device=device)[:, None] * total).flatten()
        source = torch.full((n,), -1, dtype=torch.int64, device=device)
        source[index] = torch.arange(k, device=device)
        return index, source

    def make_gather(device: str) -> tuple:
        x = torch.randn(n, e, device=device, dtype=torch.bfloat16, requires_grad=True)
        return x, rows(device)[0]

    def make_unmask(device: str) -> tuple:
        enc = torch.randn(k, e_dec, device=device, dtype=torch.bfloat16, requires_grad=True)
        table = torch.randn(tokens, e_dec, device=device, dtype=torch.bfloat16, requires_grad=True)
        source = rows(device)[1]
        masked = source < 0
        token_id = torch.where(masked, (masked.cumsum(0) - 1) % tokens, 0)  # masked ones take every id
        return enc, source, table, token_id

    programs = masking._grid(n, e_dec)[0][0]
    return [
        Case(
            preset, "gather_rows", f"{key} N={n} K={k} E={e}", traffic.gather_rows(n, k, e, 2),
            make_gather, {"triton": gather_rows, "eager": gather_rows_ref}, (0,),
        ),
        Case(
            preset, "unmask_rows", f"{key} N={n} K={k} E={e_dec} T={tokens}",
            traffic.unmask_rows(n, k, e_dec, 2, tokens, min(tokens, n - k), programs, 2),
            make_unmask, {"triton": unmask_rows, "eager": unmask_rows_ref}, (0, 2),
        ),
    ]  # fmt: skip


def cases(batch: int, presets: tuple[str, ...] = PRESETS) -> list[Case]:
    """Every benchmarked call for the presets' shapes, taken from the modality registry."""
    out = []
    for preset in presets:
        cfg = config.from_dict({"data": {"dataset": preset}})
        for name, spec in cfg.derived.modalities.items():
            out.append(_loss_case(preset, name, spec, batch))
        for key, t in info.tokens(cfg)["groups"].items():
            out.extend(_masking_cases(preset, key, t["total"], t["visible"], batch))
    return out


def passes(fn: Callable, grads: tuple[int, ...], inputs: tuple) -> dict[str, Callable[[], object]]:
    """fwd, bwd (on a retained graph) and both of `fn`, as argument-less callables on one input set."""
    wrt = [inputs[i] for i in grads]
    out = fn(*inputs)
    grad = torch.ones_like(out)
    return {
        "fwd": lambda: fn(*inputs),
        "bwd": lambda: torch.autograd.grad(out, wrt, grad, retain_graph=True),
        "both": lambda: torch.autograd.grad(fn(*inputs), wrt, grad),
    }


def _median_ms(calls: list[Callable[[], object]], runs: int, warmup: int = 10) -> float:
    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)
    ]
    for i, (start, end) in enumerate(events):
        start.record()
        calls[i % len(calls)]()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth_gb_s(runs: int) -> float:
    """The device's measured copy bandwidth: read + write of a buffer far larger than L2."""
    n = 1 << 28  # float32 elements: 1 GiB each way
    a, b = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    return 2 * n * 4 / (_median_ms([lambda: b.copy_(a)], runs) * 1e-3) / 1e9


def _commit() -> str:
    """GIT_COMMIT if set (`make gpu-check` sets it; a copy of the tree may lack .git), else git's HEAD."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return ""


def run(batch: int, runs: int, impls: tuple[str, ...], presets: tuple[str, ...] = PRESETS) -> dict:
    props = torch.cuda.get_device_properties(0)
    copy = copy_bandwidth_gb_s(runs)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit() or "unknown",
        "device": props.name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "copy_gb_s": round(copy, 1),
    }
    l2 = getattr(props, "L2_cache_size", 64 << 20)
    rows = []
    new = not RESULTS.exists() or RESULTS.stat().st_size == 0
    with RESULTS.open("a", newline="") as f:  # rows land as they are measured: a stopped run keeps them
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for case in cases(batch, presets):
            copies = -(-2 * l2 // max(case.bytes["fwd"], 1))  # input sets that together exceed 2 × L2
            sets = [case.make("cuda") for _ in range(min(copies, 4096))]
            fns = case.run | ({"compile": torch.compile(case.run["eager"])} if "compile" in impls else {})
            for impl in impls:
                per_set = [passes(fns[impl], case.grads, s) for s in sets]
                for name in ("fwd", "bwd", "both"):
                    ms = _median_ms([p[name] for p in per_set], runs)
                    gb_s = case.bytes[name] / (ms * 1e-3) / 1e9
                    row = {
                        "preset": case.preset,
                        "op": case.op,
                        "shape": case.shape,
                        "impl": impl,
                        "pass": name,
                    }
                    row |= {
                        "ms": round(ms, 4),
                        "gb_s": round(gb_s, 1),
                        "pct_copy": round(100 * gb_s / copy, 1),
                    }
                    rows.append(meta | row)
                    writer.writerow(meta | row)
                    print(f"{case.preset:13} {case.op:23} {case.shape:48} {impl:8} {name:5} "
                          f"{ms:8.4f} ms {gb_s:8.1f} GB/s {row['pct_copy']:5.1f} % of copy")  # fmt: skip
                f.flush()
            del sets
            torch.cuda.empty_cache()
    return {"gpu": True, **meta, "batch": batch, "runs": runs, "results": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runs", type=int, default=100, help="timed runs per measurement (median reported)")
    p.add_argument("--impls", default="triton,eager,compile", help="comma list of triton, eager, compile")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma list of dataset presets")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels/bench.py: no CUDA GPU on this machine; nothing measured, results.csv unchanged")
        report = {"gpu": False, "results": []}
    else:
        report = run(args.batch, args.runs, tuple(args.impls.split(",")), tuple(args.presets.split(",")))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
