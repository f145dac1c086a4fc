"""The process group of one training process.

Under Ray Train (or torchrun) the group already exists or the environment describes it
(`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`); a plain single process gets
a one-rank group over an in-process store (`HashStore`: no port to find, none another process can
take). NCCL on GPUs, gloo on CPU. DeepSpeed's shared-memory collective
op is never JIT-compiled: on CPU it would cost a C++ build (25–60 s) on every fresh machine, and
gloo all-reduce gives the same results.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


GROUP_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _single_process_group(backend: str) -> None:
    """A one-rank group when no launcher described one (no `MASTER_ADDR`). The variables are set for DeepSpeed,
    which reads this process's rank from them."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)


def skip_shm_op_build() -> None:
    """Stop DeepSpeed from JIT-compiling its CPU shared-memory collective op.

    The module must be patched through `sys.modules`: `import deepspeed.comm.torch` binds the
    real `torch` package because of name shadowing inside `deepspeed.comm`.
    """
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init(use_gpu: bool) -> Dist:
    """Join (or create) the process group and return this process's place in it."""
    import deepspeed

    skip_shm_op_build()
    backend = "nccl" if use_gpu else "gloo"
    if not torch.distributed.is_initialized() and "MASTER_ADDR" not in os.environ:
        _single_process_group(backend)
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Dist(rank, world, local_rank, device)


def barrier() -> None:
    torch.distributed.barrier()


def shutdown() -> None:
    """Leave the process group (a multi-rank run can abort at interpreter exit without this).

    Through DeepSpeed, which then also drops its cached groups, so a later `init` in the same
    process starts clean.
    """
    if torch.distributed.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
