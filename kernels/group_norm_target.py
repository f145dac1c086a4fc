"""Patch-group-normalized reconstruction targets and the masked reconstruction loss.

MAESTRO normalizes each target patch per date and per `norm_bands` group of channels:
`t̂ = (t − μ) / sqrt(σ² + eps)`, with μ and the *unbiased* σ² taken over the group's pixels × channels
(maestro_reference.md §3). The loss is the L1 or L2 error on masked tokens' valid pixels.

Shapes: `M` patches (B·N·L flattened, one per token), `P` pixels per patch (p²), `C` channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def group_norm_target_ref(
    target: Tensor, groups: Sequence[int], valid: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """Pure-torch reference. target (M, P, C); groups: channel-group sizes summing to C;
    valid (M, P) bool or None (pixels that count in the statistics). Returns (M, P, C) float32.

    Statistics use only valid pixels; a group with fewer than two valid values gets variance 0
    (the reference would divide by zero). Invalid pixels come out as 0.
    """
    t = target.float()
    if valid is None:
        valid = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
    v = valid.unsqueeze(-1).float()  # (M, P, 1)
    t = torch.where(valid.unsqueeze(-1), t, 0.0)  # NaN or garbage at invalid pixels never propagates
    out = []
    for tg in torch.split(t, list(groups), dim=-1):  # (M, P, c_g)
        n = v.sum(dim=1, keepdim=True) * tg.shape[-1]  # (M, 1, 1) values per (patch, group)
        mean = (tg * v).sum(dim=(1, 2), keepdim=True) / n.clamp_min(1)
        var = (((tg - mean) * v) ** 2).sum(dim=(1, 2), keepdim=True) / (n - 1).clamp_min(1)
        out.append((tg - mean) * torch.rsqrt(var + eps) * v)
    return torch.cat(out, dim=-1)


def masked_loss_ref(pred: Tensor, target: Tensor, mask: Tensor, kind: str = "l1") -> tuple[Tensor, Tensor]:
    """Pure-torch reference. pred, target (M, P, C); mask (M, P) bool: pixels that count (masked
    token and valid pixel). Returns (sum of per-element errors, number of elements) as float32
    scalars; the mean is their ratio. No host synchronization."""
    d = pred.float() - target.float()
    e = d.abs() if kind == "l1" else d * d
    m = mask.unsqueeze(-1)
    total = torch.where(m, e, 0.0).sum()
    count = mask.sum().float() * pred.shape[-1]
    return total, count


def group_norm_masked_loss_ref(
    pred: Tensor,
    target: Tensor,
    groups: Sequence[int] | None,
    valid: Tensor | None,
    token_mask: Tensor,
    kind: str = "l1",
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Normalize `target` per patch group (skipped when `groups` is None: raw targets), then the
    masked loss over masked tokens (token_mask (M,) bool) × valid pixels (valid (M, P) or None)."""
    if valid is None:
        valid = torch.ones(target.shape[:2], dtype=torch.bool, device=target.device)
    t = target.float() if groups is None else group_norm_target_ref(target, groups, valid, eps)
    return masked_loss_ref(pred, t, valid & token_mask.unsqueeze(-1), kind)
