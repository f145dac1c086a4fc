"""Training metrics: interval sums kept on the device, TensorBoard on rank 0, a console progress line.

Per-step values (losses, non-finite flags) are added to device tensors without any host
synchronization; at each log step `Interval.reduce` all-reduces them across ranks (two small
collectives) and brings them to the host once. Rank 0 writes the TensorBoard names listed in
cluster/README.md ("Watch TensorBoard").

MFU = achieved model FLOP/s ÷ peak FLOP/s of the devices. Model FLOPs per sample are the forward
FLOPs of `maestro info` (encoder on visible tokens, decoder on all tokens) times 3 for forward and
backward. The peak is the dense bf16 rate of the GPU from `PEAK_FLOPS`; on CPU it is the fp32
matmul rate measured at start-up on one process's threads (so CPU MFU reads "fraction of what a
large fp32 matmul achieves here").
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

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
    """TensorBoard event files of one run, written by rank 0 into `log_dir`; without one (runs on
    S3, whose event files are copied up) into a temporary `maestro-tb-*` folder removed at `close`."""

    def __init__(self, log_dir: str | Path | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.temporary = log_dir is None
        self.log_dir = tempfile.mkdtemp(prefix="maestro-tb-") if log_dir is None else str(log_dir)
        self.writer = SummaryWriter(self.log_dir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def image(self, step: int, name: str, image: torch.Tensor, caption: str = "") -> None:
        """`image` (3, H, W) in [0, 1]; the caption as text under `NAME/caption`."""
        self.writer.add_image(name, image, step, dataformats="CHW")
        if caption:
            self.writer.add_text(f"{name}/caption", caption, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        if self.temporary:
            shutil.rmtree(self.log_dir, ignore_errors=True)


MIN_SIDE = 96  # px: small rasters (S2 at 6 px) are upscaled to at least this per image
MAX_DATES = 6  # dates shown per panel (evenly spaced over the series)
_RGB = (("red", "green", "blue"), ("B04", "B03", "B02"))


def display_bands(bands: list[str] | None, channels: int) -> list[int]:
    """Three channels to show as RGB: true colour when the bands are named so, else the first
    three (the aerial presets' NIR-R-G false colour), else the first one as grey."""
    names = list(bands or [])
    for rgb in _RGB:
        if all(b in names for b in rgb):
            return [names.index(b) for b in rgb]
    return [0, 1, 2] if channels >= 3 else [0, 0, 0]


def denormalize(
    recon: torch.Tensor, target: torch.Tensor, groups: list[int] | None, patch: int
) -> torch.Tensor:
    """A reconstruction in `patch_group`/`patch` target space back in the input's units, with the
    mean and spread of the input's own patch and channel group (stats over the patch's pixels).

    recon, target (T, C, H, W); groups: consecutive channel-group sizes summing to C (None: the
    reconstruction is already in the input's units)."""
    if groups is None:
        return recon
    t, _, h, w = target.shape
    out = torch.empty_like(recon)
    start = 0
    for size in groups:
        sl = slice(start, start + size)
        x = target[:, sl].reshape(t, size, h // patch, patch, w // patch, patch)
        mean = x.mean(dim=(1, 3, 5), keepdim=True)
        std = x.std(dim=(1, 3, 5), keepdim=True, unbiased=False)
        r = recon[:, sl].reshape(x.shape)
        out[:, sl] = (r * (std + 1e-6) + mean).reshape(t, size, h, w)
        start += size
    return out


def _upscale(x: torch.Tensor, factor: int) -> torch.Tensor:
    return x.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def date_text(row: list[int] | tuple[int, ...]) -> str:
    """A `(year, day_of_year, hour)` row as `YYYY-MM-DD` (padding rows, year 0, as `-`)."""
    import datetime

    year, doy = int(row[0]), int(row[1])
    if year <= 0 or not 1 <= doy <= 366:
        return "-"
    return (datetime.date(year, 1, 1) + datetime.timedelta(days=doy - 1)).isoformat()


def reconstruction_panel(
    target: torch.Tensor,
    recon: torch.Tensor,
    pixel_mask: torch.Tensor,
    dates: torch.Tensor | None = None,
    bands: list[str] | None = None,
    norm_groups: list[int] | None = None,
    patch: int = 1,
) -> torch.Tensor:
    """Input | masked input | reconstruction, one row per date: (3, H', W') in [0, 1].

    target, recon, pixel_mask (C, H, W) for one date or (T, C, H, W) for a series (1 = masked);
    `recon` in the loss's target space, brought back to the input's units with `norm_groups` and
    `patch` (see `denormalize`). At most `MAX_DATES` dates, evenly spaced; each image upscaled
    (nearest) to at least `MIN_SIDE` px. One value scale for the three columns: per shown band,
    the 2nd–98th percentile of the input over the dates shown, so equal values are equal pixels.
    """
    t, r, m = (x.detach().float().cpu() for x in (target, recon, pixel_mask))
    if t.dim() == 3:
        t, r, m = t[None], r[None], m[None]
    r = denormalize(r, t, norm_groups, patch)
    keep = pick_dates(t.shape[0], dates)
    show = display_bands(bands, t.shape[1])
    t, r, m = (x[keep][:, show] for x in (t, r, m))  # (N, 3, H, W)
    flat = t.transpose(0, 1).reshape(3, -1)
    lo = flat.quantile(0.02, dim=1).view(1, 3, 1, 1)
    hi = flat.quantile(0.98, dim=1).view(1, 3, 1, 1)

    def scaled(x: torch.Tensor) -> torch.Tensor:
        return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)

    factor = max(1, -(-MIN_SIDE // min(t.shape[-2:])))
    cols = [scaled(t), scaled(t) * (1 - m), scaled(r)]
    cols = [_upscale(x, factor) for x in cols]  # (N, 3, H', W')
    n, _, h, w = cols[0].shape
    gap = 2
    out = torch.ones(3, n * h + (n - 1) * gap, 3 * w + 2 * gap)
    for i in range(n):
        for j, col in enumerate(cols):
            out[:, i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = col[i]
    return out


def pick_dates(count: int, dates: torch.Tensor | None) -> list[int]:
    """Up to `MAX_DATES` indices evenly spaced over the series, padding dates (year 0) left out."""
    real = [i for i in range(count) if dates is None or int(dates[i][0]) > 0] or [0]
    if len(real) <= MAX_DATES:
        return real
    step = (len(real) - 1) / (MAX_DATES - 1)
    return [real[round(k * step)] for k in range(MAX_DATES)]


def panel_caption(modality: str, key: str, dates: torch.Tensor | None, count: int, mask_ratio: float) -> str:
    """What a panel shows: modality, sample, the dates of its rows, the masked fraction."""
    keep = pick_dates(count, dates)
    shown = ", ".join(date_text(dates[i].tolist()) for i in keep) if dates is not None else "one date"
    return (
        f"{modality}, sample {key}: rows = dates {shown}; columns = input | masked input | "
        f"reconstruction; {mask_ratio:.0%} of its pixels masked"
    )


def sample_panel(
    name: str, spec: Any, target_norm: str, out: Any, batch: dict[str, Any]
) -> tuple[torch.Tensor, str]:
    """The panel and caption of the batch's first sample for modality `name` (TensorBoard
    `images/NAME` and `images/NAME/caption`), from the model output `out` and its batch."""
    from maestro.model.targets import norm_plan

    plan = norm_plan(name, spec, target_norm)
    groups = None if plan[0] is None else [size for sizes in plan for size in sizes]
    lo, hi = 0, out.targets[name].shape[1]
    cu = batch.get(f"{name}_cu_dates")
    if cu is not None:  # packed: sample 0's dates are the first run of the concatenated series
        lo, hi = int(cu[0]), int(cu[1])
    target, recon, mask = (x[name][0, lo:hi] for x in (out.targets, out.reconstructions, out.pixel_masks))
    dates = batch.get(f"{name}_dates")
    if dates is not None:
        dates = dates.reshape(-1, 3)[lo:hi] if cu is not None else dates[0]
    image = reconstruction_panel(target, recon, mask, dates, spec.bands, groups, spec.patch_size)
    keys = batch.get("_keys") or ["?"]
    ratio = float(mask.float().mean())
    return image, panel_caption(name, str(keys[0]), dates, target.shape[0], ratio)


def progress_line(step: int, total: int, loss: float, samples_per_s: float, seconds_per_step: float) -> str:
    eta = int(max(total - step, 0) * seconds_per_step)
    return (
        f"step {step}/{total}  loss {loss:.4f}  {samples_per_s:.1f} samples/s  "
        f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
    )
