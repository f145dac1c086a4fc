"""The DeepSpeed ZeRO engine around the model, from the resolved config.

The config dict comes from `maestro.config.deepspeed_config` (the one place it is built), for the
world size actually running. The optimizer and schedule are client torch objects
(`maestro.train.optim`): DeepSpeed's own config optimizers would JIT-build fused ops on CPU.
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch

from maestro import config
from maestro.config import Config


def build_engine(
    cfg: Config,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    world_size: int,
    use_gpu: bool,
) -> deepspeed.DeepSpeedEngine:
    """Wrap `model` (ZeRO stage, precision, clipping and accumulation from `cfg`)."""
    ds_config = config.deepspeed_config(cfg, world_size, use_gpu)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    return engine


def compute_dtype(engine: deepspeed.DeepSpeedEngine) -> torch.dtype:
    """The dtype the engine's module computes in (bf16 when enabled, else fp32)."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def local_shards(module: torch.nn.Module) -> list[torch.Tensor]:
    """This rank's part of each parameter: the ZeRO-3 partition, or the whole tensor below stage 3."""
    return [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in module.parameters()]
