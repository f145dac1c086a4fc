"""The DeepSpeed ZeRO engine around the model, from the resolved config.

The config dict comes from `maestro.config.deepspeed_config` (the one place it is built), for the
world size actually running. The optimizer and schedule are client torch objects
(`maestro.train.optim`): DeepSpeed's own config optimizers would JIT-build fused ops on CPU.
Checkpoints are read back with `torch.load(weights_only=True)` (`safe_load`): a checkpoint in shared
storage is never trusted to run code.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import deepspeed
import torch

from maestro import config
from maestro.config import Config
from maestro.errors import CheckpointError


def build_engine(
    cfg: Config,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    world_size: int,
    use_gpu: bool,
) -> deepspeed.DeepSpeedEngine:
    """Wrap `model` (ZeRO stage, precision, clipping and accumulation from `cfg`; stage 0 on one rank)."""
    ds_config = config.deepspeed_config(cfg, world_size, use_gpu)
    if world_size == 1:
        # One rank has nothing to partition: stages 1–3 would only add copies of every gradient.
        ds_config["zero_optimization"] = {"stage": 0}
    wrapped = DictOutputs(model)
    if ds_config["zero_optimization"]["stage"] == 3:
        register_leaf_parameters(wrapped)
    engine, _, _, _ = deepspeed.initialize(
        model=wrapped, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    if world_size == 1:
        engine.enable_backward_allreduce = False  # an all-reduce over one rank is the identity
    # Every file DeepSpeed reads back (model states, optimizer partitions) goes through this call.
    engine.checkpoint_engine.load = safe_load
    return engine


def _deepspeed_checkpoint_classes() -> list[type]:
    """The DeepSpeed classes its checkpoints hold besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str, map_location: Any = None) -> Any:
    """`torch.load` with `weights_only=True`: tensors, plain containers and the allowlisted DeepSpeed
    classes only; anything else in the file is refused with a `CheckpointError` naming it."""
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), str(e)[:200])
        raise CheckpointError(
            f"{path}: refused to load ({reason}); maestro loads checkpoints weights-only and never "
            "runs code from them. Delete this checkpoint folder to resume from the one before it."
        ) from e


class DictOutputs(torch.nn.Module):
    """The model with its output dataclass returned as a dict of its fields.

    ZeRO-3 finds the tensors of a module's output in tuples, lists and dicts only; through them it
    gathers the module's partitioned parameters again for the backward pass. The engine's output
    is read back as attributes (`out.loss`) by `maestro.train.loop`.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        out = self.model(*args, **kwargs)
        return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}


def register_leaf_parameters(model: torch.nn.Module) -> None:
    """Have ZeRO-3 gather each leaf module's parameters whenever the leaf's parent runs.

    ZeRO-3 gathers parameters only around their own module's forward. Containers
    (`ParameterDict`) have none, and a parent may use a child's weight directly
    (`F.linear(x, self.conv.weight)`); registering leaf parameters with the parent covers both,
    at the cost of gathering them one module level earlier.
    """
    for parent in model.modules():
        # The wrapped model's own output is a dataclass: its leaves go to the wrapper.
        owner = model if isinstance(model, DictOutputs) and parent is model.model else parent
        for child in parent.children():
            if next(child.children(), None) is None:
                for p in child.parameters(recurse=False):
                    deepspeed.zero.register_external_parameter(owner, p)


def compute_dtype(engine: deepspeed.DeepSpeedEngine) -> torch.dtype:
    """The dtype the engine's module computes in (bf16 when enabled, else fp32)."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def local_shards(module: torch.nn.Module) -> list[torch.Tensor]:
    """This rank's part of each parameter: the ZeRO-3 partition, or the whole tensor below stage 3."""
    return [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in module.parameters()]
