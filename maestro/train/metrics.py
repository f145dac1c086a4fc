"""Training metrics: interval sums kept on the device, TensorBoard on rank 0, a console progress line.

Per-step values (losses, non-finite flags) are added to device tensors without any host
synchronization; at each log step `Interval.reduce` all-reduces them across ranks (two small
collectives) and brings them to the host once. Rank 0 writes the TensorBoard names of DESIGN.md.

MFU = achieved model FLOP/s ÷ peak FLOP/s of the devices. Model FLOPs per sample are the forward
FLOPs of `maestro info` (encoder on visible tokens, decoder on all tokens) times 3 for forward and
backward. The peak is the dense bf16 rate of the GPU from `PEAK_FLOPS`; on CPU it is the fp32
matmul rate measured at start-up on one process's threads (so CPU MFU reads "fraction of what a
large fp32 matmul achieves here").
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched against the CUDA
# device name, most specific first.
PEAK_FLOPS = {
    "GB200": 2.5e15,
    "B200": 2.25e15,
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "V100": 125e12,
    "MI300X": 1307e12,
    "MI325X": 1307e12,
}


def measured_cpu_flops(seconds: float = 0.3, n: int = 512) -> float:
    """fp32 matmul FLOP/s of this process's threads: the CPU 'peak' for MFU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one device: the table for GPUs (0.0 when unknown: MFU is then not logged)."""
    if device.type != "cuda":
        return measured_cpu_flops()
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return 0.0


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


class Interval:
    """Per-step losses summed on the device between two log steps, plus divergence and stop flags,
    and the samples and tokens trained (host counts: packed batches vary in both)."""

    NO_STEP = 2**62

    def __init__(self, names: list[str], device: torch.device):
        self.names = names  # "loss" first, then one per modality
        self.device = device
        self.reset()

    def reset(self) -> None:
        n = len(self.names)
        self.sums = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.bad = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.first_bad = torch.full((), self.NO_STEP, dtype=torch.int64, device=self.device)
        self.steps = 0
        self.samples = self.tokens = 0

    def count(self, samples: int, tokens: int) -> None:
        """Add one micro-batch's samples and (unpadded) tokens, known on the host from the loader."""
        self.samples += samples
        self.tokens += tokens

    def add(self, step: int, losses: list[torch.Tensor]) -> None:
        """Add one step's losses (scalars, in `names` order); no host synchronization."""
        values = torch.stack([v.detach().to(torch.float64) for v in losses])  # (N,)
        finite = torch.isfinite(values)
        self.sums += torch.where(finite, values, 0.0)
        self.bad |= ~finite
        step_t = torch.full((), step, dtype=torch.int64, device=self.device)
        self.first_bad = torch.where(finite.all(), self.first_bad, torch.minimum(self.first_bad, step_t))
        self.steps += 1

    def reduce(self, skipped: int, stop: bool) -> dict:
        """All-reduce across ranks and return host values (every rank calls this, in step)."""
        world = torch.distributed.get_world_size()
        total = torch.cat(
            [
                self.sums,
                self.bad.to(torch.float64),
                torch.tensor(
                    [float(skipped), float(self.samples), float(self.tokens)],
                    dtype=torch.float64,
                    device=self.device,
                ),
            ]
        )
        torch.distributed.all_reduce(total)
        lowest = torch.stack([self.first_bad, torch.tensor(-int(stop), device=self.device)])
        torch.distributed.all_reduce(lowest, op=torch.distributed.ReduceOp.MIN)
        total, lowest = total.tolist(), lowest.tolist()
        n = len(self.names)
        clean_steps = max(self.steps, 1) * world
        out = {
            "losses": {k: total[i] / clean_steps for i, k in enumerate(self.names)},
            "nonfinite": [k for i, k in enumerate(self.names) if total[n + i] > 0],
            "first_bad_step": None if lowest[0] == self.NO_STEP else int(lowest[0]),
            "skipped": int(total[2 * n]),
            "samples": int(total[2 * n + 1]),  # all ranks
            "tokens": int(total[2 * n + 2]),
            "stop": lowest[1] < 0,
        }
        self.reset()
        return out


class Board:
    """TensorBoard event files of one run, written by rank 0 into `log_dir`."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = str(log_dir)
        self.writer = SummaryWriter(self.log_dir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def image(self, step: int, name: str, image: torch.Tensor) -> None:
        """`image` (3, H, W) in [0, 1]."""
        self.writer.add_image(name, image, step, dataformats="CHW")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def reconstruction_panel(target: torch.Tensor, recon: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """Input | masked input | reconstruction, side by side: (3, H, 3·W + 4) in [0, 1].

    target, recon, pixel_mask (C, H, W): one image of one date in the loss's target space, and 1
    where masked. Shown: the first three bands (or the first band as grey), each panel stretched
    to its own per-band range (with `patch_group` targets the reconstruction is in normalized
    patch space, not in the input's units).
    """
    bands = slice(0, 3) if target.shape[0] >= 3 else [0, 0, 0]
    t, r, m = (x.detach().float().cpu()[bands] for x in (target, recon, pixel_mask))  # (3, H, W)

    def show(x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
        return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)

    gap = torch.ones(3, t.shape[1], 2)
    return torch.cat([show(t), gap, show(t) * (1 - m), gap, show(r)], dim=2)


def progress_line(step: int, total: int, loss: float, samples_per_s: float, seconds_per_step: float) -> str:
    eta = int(max(total - step, 0) * seconds_per_step)
    return (
        f"step {step}/{total}  loss {loss:.4f}  {samples_per_s:.1f} samples/s  "
        f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
    )
