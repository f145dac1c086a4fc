"""What this machine offers a local run: the CPU cores this process may use and the CUDA GPUs.

The one place both `run.workers=auto` (config) and the launcher's resource check count them.
"""

from __future__ import annotations

import os


def cpus() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and batch systems set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def gpus() -> int:
    """CUDA devices visible to this process (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
