"""Exponential moving average of the model's parameters (maestro_reference.md §1.13).

`θ_ema ← m·θ_ema + (1 − m)·θ` over a list of parameter tensors, kept in float32 on their device,
without a host sync. Only parameters are averaged, not buffers, as the reference. The reference
updates once per epoch with `m = 1 − 1/(0.2·max_epochs)` (`reference_momentum`); training here
updates after every optimizer step with `train.ema_momentum`. Given a rank's ZeRO-3 partitions
instead of whole tensors, the average is sharded like the weights.
"""

from __future__ import annotations

import torch

from maestro.errors import CheckpointError


def reference_momentum(max_epochs: int) -> float:
    """The reference's per-epoch momentum: 0.95 for 100 epochs, 0.9 for 50, 0.5 for 10."""
    return 1.0 - 1.0 / (0.2 * max_epochs)


class EMA:
    """A float32 shadow copy of `tensors`, averaged in place by `update()`."""

    def __init__(self, tensors: list[torch.Tensor], momentum: float):
        self.tensors = tensors
        self.momentum = momentum
        self.shadow = [t.detach().float().clone() for t in tensors]

    @torch.no_grad()
    def update(self) -> None:
        current = [t.float() for t in self.tensors]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.momentum)

    @torch.no_grad()
    def copy_to(self, tensors: list[torch.Tensor]) -> None:
        """Write the average into `tensors` (e.g. the parameters of a model copy for evaluation)."""
        for t, s in zip(tensors, self.shadow, strict=True):
            t.copy_(s)

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shapes = [tuple(s.shape) for s in self.shadow]
        loaded = [tuple(s.shape) for s in state["shadow"]]
        if shapes != loaded:
            raise CheckpointError(
                f"the EMA state holds tensors of shapes {loaded[:3]}…, the model {shapes[:3]}…; "
                "resume with the model config (model.size, data.inputs) the run was started with"
            )
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
