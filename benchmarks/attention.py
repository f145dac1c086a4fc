"""Attention backends timed on the model's own sequence shapes (a step of `make gpu-check`).

    python -m benchmarks.attention CONFIG [key=value ...] [--runs 20] [--json]

The shapes come from the model itself: one forward of `build_model(cfg)` in bf16 on one batch of
`data.shards`, with every attention call recorded (sequences S, heads H, length L, head width D, and
how many calls per forward). Each dense shape is then timed forward + backward with CUDA events
(warm-up, median of `--runs`) under PyTorch SDPA's flash, cuDNN and memory-efficient backends, and
with flash-attn's `flash_attn_func` where that function imports; `per_forward_ms` weights each shape
by its calls, so the backends compare on the model's whole attention work. Variable-length (packed)
calls are listed, not timed. Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from maestro.cli_info import add_config_arguments

SDPA = ("flash", "cudnn", "efficient")  # torch.nn.attention.SDPBackend members


def record_shapes(cfg: Any, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Counter:
    """{(S, H, L, D) or ("packed", N, H, D, max_len): calls} over one forward (autocast to `dtype`)
    on a real batch of `data.shards`."""
    from maestro.data import build_loader
    from maestro.model import blocks, build_model

    # Under autocast, as inference runs: nothing here may import deepspeed (the train loop does),
    # which a GPU machine for this check may lack.
    model = build_model(cfg).to(device)
    batch = next(iter(build_loader(cfg, 0, 1, train=True)))
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    calls: Counter = Counter()
    inner = blocks.attention

    def spy(q, k, v, packing, backend="sdpa"):
        n, h, d = q.shape
        if packing.uniform is not None:
            calls[(n // packing.uniform, h, packing.uniform, d)] += 1
        else:
            calls[("packed", n, h, d, packing.max_seqlen)] += 1
        return inner(q, k, v, packing, backend)

    blocks.attention = spy
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            model(batch, generator=torch.Generator(device).manual_seed(0))
    finally:
        blocks.attention = inner
    return calls


def _median_ms(fn: Callable[[], object], runs: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)
    ]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _flash_attn() -> Callable | None:
    """flash-attn's dense function, if it really imports (an empty `flash_attn` namespace does not count)."""
    try:
        from flash_attn import flash_attn_func
    except (ImportError, AttributeError):
        return None
    return flash_attn_func if callable(flash_attn_func) else None


def time_shape(s: int, h: int, length: int, d: int, runs: int) -> dict[str, Any]:
    """fwd + bwd ms of one (S, H, L, D) bf16 attention per backend; an error message where one refuses."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    kinds["efficient"] = SDPBackend.EFFICIENT_ATTENTION
    q, k, v = (
        torch.randn(s, h, length, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv"
    )
    grad = torch.randn_like(q)
    out: dict[str, Any] = {}
    for name in SDPA:

        def step(name=name):
            with sdpa_kernel(kinds[name]):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                torch.autograd.grad(out, (q, k, v), grad)  # no accumulation into .grad between runs

        try:
            out[name] = round(_median_ms(step, runs), 4)
        except RuntimeError as e:
            out[name] = f"unsupported: {str(e).splitlines()[0][:160]}"
    fa = _flash_attn()
    if fa is None:
        out["flash_attn"] = "skipped: flash_attn.flash_attn_func does not import"
    else:
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        gt = grad.transpose(1, 2).contiguous()
        out["flash_attn"] = round(
            _median_ms(lambda: torch.autograd.grad(fa(qt, kt, vt), (qt, kt, vt), gt), runs), 4
        )
    return out


def bench(cfg: Any, runs: int) -> dict[str, Any]:
    calls = record_shapes(cfg, torch.device("cuda"))
    shapes, packed = [], []
    total: dict[str, float | None] = {}
    for key, n in sorted(calls.items(), key=str):
        if key[0] == "packed":
            packed.append(
                {"rows": key[1], "heads": key[2], "dim_head": key[3], "max_len": key[4], "calls": n}
            )
            continue
        s, h, length, d = key
        ms = time_shape(s, h, length, d, runs)
        shapes.append({"seqs": s, "heads": h, "len": length, "dim_head": d, "calls": n, "fwd_bwd_ms": ms})
        for name, value in ms.items():  # a backend that refuses one shape cannot run the model
            ok = isinstance(value, float) and total.get(name, 0.0) is not None
            total[name] = total.get(name, 0.0) + n * value if ok else None
    timed = {k: round(v, 3) for k, v in total.items() if v is not None}
    return {
        "gpu": True,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "runs": runs,
        "shapes": shapes,
        "packed_not_timed": packed,
        "per_forward_ms": timed,
        "fastest": min(timed, key=timed.get) if timed else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.splitlines()[0])
    add_config_arguments(p)
    p.add_argument("--runs", type=int, default=20, help="timed runs per shape and backend (median)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/attention.py: no CUDA GPU on this machine; nothing measured")
        report: dict[str, Any] = {"gpu": False}
    else:
        from maestro import config

        report = bench(config.load(args.config, args.overrides), args.runs)
        for shape in report["shapes"]:
            print(f"S={shape['seqs']} H={shape['heads']} L={shape['len']} D={shape['dim_head']} "
                  f"x{shape['calls']}: {shape['fwd_bwd_ms']}")  # fmt: skip
        print(f"per forward (fwd + bwd ms): {report['per_forward_ms']}; fastest: {report['fastest']}")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
