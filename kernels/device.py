"""Where the Triton kernels can run: CUDA tensors, or any tensor when the kernels were decorated under
the Triton interpreter (`TRITON_INTERPRET=1` set before `kernels` is imported, as the tests do)."""

from __future__ import annotations

from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction


def check_launchable(kernel, x: Tensor) -> None:
    """Raises a ValueError that says how to fix it, instead of Triton's "0 active drivers"."""
    if not x.is_cuda and not isinstance(kernel, InterpretedFunction):
        raise ValueError(
            f"model.kernels=triton needs CUDA tensors, got a {x.device} tensor: use model.kernels=torch "
            "on this machine (or set TRITON_INTERPRET=1 before importing kernels, for tests)"
        )
