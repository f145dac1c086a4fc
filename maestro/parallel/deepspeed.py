"""The DeepSpeed ZeRO engine around the model, from the resolved config.

The config dict comes from `maestro.config.deepspeed_config` (the one place it is built), for the
world size actually running. The optimizer and schedule are client torch objects
(`maestro.train.optim`): DeepSpeed's own config optimizers would JIT-build fused ops on CPU.
What steps the weights in bf16 (fp32 master weights at every stage; no host sync in the step at
ZeRO 0, one read of the global gradient norm per step inside DeepSpeed's ZeRO optimizers):
ZeRO 0 keeps fp32 weights, computes under `torch.autocast(bf16)` and steps torch's AdamW (fused on
GPU, foreach on CPU); ZeRO 1-2 run DeepSpeed's `DeepSpeedZeroOptimizer` and ZeRO 3
`DeepSpeedZeroOptimizer_Stage3` (bf16 weights, fp32 master partitions). bf16 weights at ZeRO 0
would make DeepSpeed wrap the optimizer in its unfused fp16-style optimizer, a Python loop over
the parameters with host syncs.
Checkpoints are read back with `torch.load(weights_only=True)` (`safe_load`): a checkpoint in shared
storage is never trusted to run code.

Resuming at another world size (an elastic restart) goes through DeepSpeed's universal checkpoints:
`to_universal` converts a ZeRO checkpoint once, and an engine built with `load_universal=True`
loads it into its own partitioning. DeepSpeed's converter and universal loader call `torch.load`
with `weights_only=False`; both run under `weights_only_loads`, which makes every load weights-only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import pickle
import re
from collections.abc import Iterator
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
    stage: int | None = None,
    load_universal: bool = False,
) -> deepspeed.DeepSpeedEngine:
    """Wrap `model` (ZeRO stage, precision, clipping and accumulation from `cfg`; the stage as in
    `config.deepspeed_config`). `load_universal`: the engine will load a universal checkpoint."""
    ds_config = config.deepspeed_config(cfg, world_size, use_gpu, stage)
    stage = ds_config["zero_optimization"]["stage"]
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    wrapped = DictOutputs(model)
    if stage == 3:
        register_leaf_parameters(wrapped)
    engine, _, _, _ = deepspeed.initialize(
        model=wrapped, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    if world_size == 1 and stage == 0:
        engine.enable_backward_allreduce = False  # an all-reduce over one rank is the identity
        # (ZeRO 1-3 gather their partitioned gradients on this path: it stays on for them)
    # Every file DeepSpeed reads back (model states, optimizer partitions) goes through this call.
    engine.checkpoint_engine.load = safe_load
    return engine


def _deepspeed_checkpoint_classes() -> list[type]:
    """The DeepSpeed classes its checkpoints hold besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: Any, map_location: Any = None, _load: Any = None, **kwargs: Any) -> Any:
    """`torch.load` with `weights_only=True`: tensors, plain containers and the allowlisted DeepSpeed
    classes only; anything else in the file is refused with a `CheckpointError` naming it.
    A caller's `weights_only` is overridden; `_load` is the real `torch.load` (see below)."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
            return (_load or torch.load)(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        reason = f"an object of class {found.group(1)}" if found else "something other than tensors"
        raise CheckpointError(
            f"{path}: refused to load: it holds {reason}, and maestro loads checkpoints weights-only "
            "(tensors, plain containers and DeepSpeed's own state classes), never running code from them; "
            "a file written by other code, or altered, is not a maestro checkpoint"
        ) from e


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block, every `torch.load` in this process is `safe_load`, whatever its caller asks."""
    real = torch.load
    torch.load = functools.partial(safe_load, _load=real)
    try:
        yield
    finally:
        torch.load = real


# What DeepSpeed's universal converter writes in each checkpoint's `universal_checkpoint_info`
# (ZeRO 1/2 conversions assert that the key exists; plain models have nothing else to declare).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


def to_universal(src: str, dst: str) -> None:
    """Convert the ZeRO checkpoint folder `src` (one tag) into a universal checkpoint folder `dst`,
    in this process (no worker pool), every file read weights-only."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=src,
        output_folder=dst,
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with weights_only_loads(), contextlib.redirect_stdout(None):
        ds_to_universal.main(args)


def reshard_zero3(parts: list[list[torch.Tensor]], module: torch.nn.Module, rank: int) -> list[torch.Tensor]:
    """This rank's ZeRO-3 partitions of per-parameter tensors saved as partitions by `len(parts)`
    ranks (`parts[r][i]`: rank r's part of parameter i): joined, cut to the parameter's size and
    split again the way this run's ZeRO-3 partitions its parameters."""
    out = []
    for i, p in enumerate(module.parameters()):
        whole = torch.cat([rank_parts[i].flatten() for rank_parts in parts])[: p.ds_numel]
        size = p.ds_tensor.numel()
        mine = whole[rank * size : (rank + 1) * size]
        out.append(torch.cat([mine, mine.new_zeros(size - mine.numel())]))
    return out


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


def precision(engine: deepspeed.DeepSpeedEngine) -> str:
    """ "bf16" when the engine computes in bf16 (bf16 weights, or autocast at ZeRO 0), else "fp32"."""
    autocast = engine.torch_autocast_enabled() and engine.torch_autocast_dtype() == torch.bfloat16
    return "bf16" if engine.bfloat16_enabled() or autocast else "fp32"


def optimizer_name(engine: deepspeed.DeepSpeedEngine) -> str:
    """The optimizer that steps the weights: DeepSpeed's wrapper, or torch's own with its mode."""
    opt = engine.optimizer
    if opt is not engine.basic_optimizer:
        return type(opt).__name__
    mode = "fused" if opt.defaults.get("fused") else "foreach" if opt.defaults.get("foreach") else "for-loop"
    return f"{type(opt).__name__} ({mode})"


def expected_optimizer(stage: int, use_gpu: bool) -> str:
    """What `optimizer_name` gives for an engine of `build_engine` at ZeRO `stage` (any precision)."""
    if stage == 0:
        return f"AdamW ({'fused' if use_gpu else 'foreach'})"
    return "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"


def local_shards(module: torch.nn.Module) -> list[torch.Tensor]:
    """This rank's part of each parameter: the ZeRO-3 partition, or the whole tensor below stage 3."""
    return [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in module.parameters()]
