"""Reconstruction targets and the masked loss (maestro_reference.md §3).

Per modality the target patches are normalized per patch, date and `norm_bands` group
(`patch_group`, MAESTRO), over all bands of a band group (`patch`, MAE's norm-pix) or not at all
(`none`); the L1/L2 error counts on masked tokens' valid pixels only. Modalities are weighted by
`w_m = N_m·g_m²` (dates × grid area); one with no counted element drops out of both the numerator
and the denominator, decided on the device (no host sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from maestro.errors import ConfigError
from maestro.modalities import ModalitySpec
from maestro.model.ops import KernelOps

EPS = 1e-6


def norm_plan(name: str, spec: ModalitySpec, target_norm: str) -> list[list[int] | None]:
    """Per band group, the normalization group sizes of its channels (None: raw targets)."""
    if target_norm == "none":
        return [None for _ in spec.groups]
    if target_norm == "patch":
        return [[c] for c in spec.groups]
    plan, norm, i = [], list(spec.norm_groups), 0
    for c in spec.groups:
        sizes, filled = [], 0
        while filled < c and i < len(norm):
            sizes.append(norm[i])
            filled, i = filled + norm[i], i + 1
        if filled != c:
            raise ConfigError(
                f"data.modalities.{name}.norm_bands",
                spec.norm_bands,
                f"groups that nest inside the band groups {spec.groups}",
            )
        plan.append(sizes)
    return plan


def modality_loss(
    ops: KernelOps,
    pred: Tensor,
    target: Tensor,
    valid: Tensor,
    token_mask: Tensor,
    band_groups: list[int],
    plan: list[list[int] | None],
    kind: str,
) -> tuple[Tensor, Tensor]:
    """pred, target (M, P, C) patches; valid (M, P) bool; token_mask (G, M) bool (True = masked).
    Returns (sum of errors, number of counted elements) over the band groups."""
    total = count = pred.new_zeros((), dtype=torch.float32)
    preds, targets = torch.split(pred, band_groups, -1), torch.split(target, band_groups, -1)
    for g, (p, t, groups) in enumerate(zip(preds, targets, plan)):
        s, n = ops.group_norm_masked_loss(p, t, groups, valid, token_mask[g], kind, EPS)
        total, count = total + s, count + n
    return total, count


def combine(sums: dict[str, tuple[Tensor, Tensor]], weights: dict[str, float]) -> tuple[Tensor, dict]:
    """Weighted mean of per-modality losses; modalities with nothing counted drop out."""
    per_mod, num, den = {}, 0.0, 0.0
    for m, (s, n) in sums.items():
        has = n > 0
        per_mod[m] = torch.where(has, s / n.clamp_min(1), 0.0)
        w = torch.where(has, weights[m], 0.0)
        num, den = num + w * per_mod[m], den + w
    return num / torch.as_tensor(den).clamp_min(1e-12), per_mod
