"""The one dispatch point between the model and the fused kernels (`model.kernels`).

`torch` uses the pure-torch references of `kernels/`; `triton` the Triton ops with the same
signatures (CUDA tensors, or the Triton interpreter in tests). Everything the model does with
masked rows and normalized targets goes through here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kernels.group_norm_target import group_norm_masked_loss, group_norm_masked_loss_ref
from kernels.masking import gather_rows, gather_rows_ref, unmask_rows, unmask_rows_ref
from maestro.errors import ConfigError


@dataclass(frozen=True)
class KernelOps:
    gather_rows: Callable  # (x (N, E), index (K,)) -> (K, E)
    unmask_rows: Callable  # (enc (K, E), source (N,), table (T, E), token_id (N,)) -> (N, E)
    group_norm_masked_loss: Callable  # (pred, target, groups, valid, token_mask, kind, eps) -> (sum, count)


OPS = {
    "torch": KernelOps(gather_rows_ref, unmask_rows_ref, group_norm_masked_loss_ref),
    "triton": KernelOps(gather_rows, unmask_rows, group_norm_masked_loss),
}


def kernel_ops(name: str) -> KernelOps:
    """The ops for `model.kernels=name`."""
    if name not in OPS:
        raise ConfigError("model.kernels", name, f"one of {sorted(OPS)}")
    return OPS[name]
