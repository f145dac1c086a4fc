"""Exponential moving average of the model's parameters (maestro_reference.md §1.13).

The reference keeps a frozen deep copy taken at construction and updates it once per epoch with
`m = 1 − 1/(0.2·max_epochs)` (`reference_momentum`); the usual alternative is a per-step update
with a fixed momentum close to 1 (`train.ema_momentum`). Both use `ema_update`. Only parameters are
averaged, not buffers, as the reference.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of `model` to hold the average."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


def reference_momentum(max_epochs: int) -> float:
    """The reference's per-epoch momentum: 0.95 for 100 epochs, 0.9 for 50, 0.5 for 10."""
    return 1.0 - 1.0 / (0.2 * max_epochs)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, momentum: float) -> None:
    """θ_ema ← m·θ_ema + (1 − m)·θ for every parameter, in place, without a host sync."""
    ema_params = [p for _, p in sorted(ema.named_parameters())]
    params = [p.detach() for _, p in sorted(model.named_parameters())]
    if len(ema_params) != len(params):
        raise ValueError(f"EMA copy has {len(ema_params)} parameters, the model {len(params)}")
    torch._foreach_lerp_(ema_params, params, 1.0 - momentum)
