"""Multi-head attention backends over padded batches and packed variable-length sequences.

Tokens travel as rows `(N, H, D)` with a `Packing` that says where each sequence starts
(`cu_seqlens`, as flash-attn's varlen API). When every sequence has the same length the rows are a
padded batch in disguise, and `sdpa`/`math` take their dense path; otherwise:
- `flash`: flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16), always;
- `sdpa`: on CUDA in fp16/bf16, PyTorch's own variable-length flash attention
  (`torch.nn.attention.varlen.varlen_attn`); elsewhere the rows are scattered into a `(S, L_max)`
  padded batch with a key-padding mask;
- `math`: the same padding, then `softmax(QKᵀ·D^-½)·V` written out (the readable reference).

Whether `flash` can run is checked once, when the model is built (`check_backend`). The dense SDPA
path runs whichever kernel PyTorch picks; `sdpa_kernel(name)` forces one of `sdpa_backends()`
(e.g. to time FlashAttention against cuDNN on the model's own shapes).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.nn.attention import SDPBackend
from torch.nn.attention import sdpa_kernel as _sdpa_kernel

from maestro.errors import ConfigError

BACKENDS = ("flash", "sdpa", "math")
HALF = (torch.float16, torch.bfloat16)
SDPA_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


@dataclass(frozen=True)
class Packing:
    """Sequence boundaries of a set of rows: `cu_seqlens` (S+1,) int32 starting at 0, `max_seqlen`
    the longest sequence; `uniform` the common length when all sequences have it (None otherwise);
    `total` the number of rows when known on the host."""

    cu_seqlens: Tensor
    max_seqlen: int
    uniform: int | None = None
    total: int | None = None

    @staticmethod
    def dense(num_seqs: int, length: int, device: torch.device) -> Packing:
        """`num_seqs` sequences of `length` rows each (a padded batch flattened to rows)."""
        cu = torch.arange(num_seqs + 1, device=device, dtype=torch.int32) * length
        return Packing(cu, length, length, num_seqs * length)

    @staticmethod
    def from_lengths(lengths: Tensor) -> Packing:
        """Sequences of the given lengths (S,) int; one host sync to learn the longest."""
        cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        longest, shortest = int(lengths.max()), int(lengths.min())
        return Packing(cu, longest, longest if longest == shortest else None)

    @staticmethod
    def from_list(lengths: list[int], device: torch.device) -> Packing:
        """Sequences of lengths known on the host (no sync)."""
        cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(device, torch.int32)
        longest = max(lengths, default=0)
        return Packing(cu, longest, longest if min(lengths, default=0) == longest else None, sum(lengths))

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1


@functools.cache
def torch_varlen() -> Callable | None:
    """PyTorch's variable-length attention (torch >= 2.10), imported on first use: its module
    loads torch._dynamo (about a second of every process start), which CPU processes never need.
    None on older torch: packed rows take the padded SDPA path."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def flash_varlen() -> Callable | None:
    """flash-attn's `flash_attn_varlen_func`, the function the `flash` backend calls; None where it
    is missing. `flash-attn-4` installs `flash_attn` as an empty namespace package, so a successful
    `import flash_attn` proves nothing: the function itself must be there."""
    try:
        import flash_attn
    except ImportError:
        return None
    fn = getattr(flash_attn, "flash_attn_varlen_func", None)
    return fn if callable(fn) else None


def check_backend(name: str) -> None:
    """Raise a ConfigError if `model.attention=name` cannot run here (checked once, at build time;
    the device and dtype, which may change after building, are checked when flash runs)."""
    if name not in BACKENDS:
        raise ConfigError("model.attention", name, f"one of {BACKENDS}")
    if name == "flash" and flash_varlen() is None:
        raise ConfigError(
            "model.attention",
            name,
            "sdpa or math (flash-attn 2 with flash_attn.flash_attn_varlen_func is not installed: "
            "pip install flash-attn; flash-attn-4 alone does not provide it)",
        )


def sdpa_backends() -> list[str]:
    """Names of the SDPA kernels `sdpa_kernel` can force."""
    return list(SDPA_KERNELS)


@contextlib.contextmanager
def sdpa_kernel(name: str) -> Iterator[None]:
    """Within the block, the dense `sdpa` path runs only SDPA kernel `name` (one of `sdpa_backends()`);
    PyTorch raises if that kernel cannot run the shapes."""
    if name not in SDPA_KERNELS:
        raise ValueError(f"SDPA kernel {name!r} must be one of {sdpa_backends()}")
    with _sdpa_kernel([SDPA_KERNELS[name]]):
        yield


def _slots(packing: Packing, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Where each of `n` packed rows sits in a padded (S·L_max) layout, and which slots hold a row."""
    rows = torch.arange(n, device=device)
    seq = torch.searchsorted(packing.cu_seqlens[1:], rows, right=True)  # (N,) sequence of each row
    slot = seq * packing.max_seqlen + rows - packing.cu_seqlens[seq]
    keep = torch.zeros(packing.num_seqs * packing.max_seqlen, dtype=torch.bool, device=device)
    return slot, keep.index_fill(0, slot, True).view(packing.num_seqs, packing.max_seqlen)


def _pad(x: Tensor, slot: Tensor, packing: Packing) -> Tensor:
    """Rows (N, H, D) -> padded (S, H, L_max, D), zeros in the empty slots."""
    padded = x.new_zeros(packing.num_seqs * packing.max_seqlen, *x.shape[1:]).index_copy(0, slot, x)
    return rearrange(padded, "(s l) h d -> s h l d", s=packing.num_seqs)


def _math(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
    """(S, H, L, D) each; keep (S, L) keys that count. softmax(QKᵀ·D^-½)·V, computed in fp32."""
    scores = torch.einsum("shid,shjd->shij", q.float(), k.float()) * q.shape[-1] ** -0.5
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.einsum("shij,shjd->shid", scores.softmax(-1), v.float()).to(q.dtype)


def _dense(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, backend: str) -> Tensor:
    if backend == "math":
        return _math(q, k, v, keep)
    mask = None if keep is None else keep[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention(q: Tensor, k: Tensor, v: Tensor, packing: Packing, backend: str = "sdpa") -> Tensor:
    """Attention of rows q, k, v (N, H, D) within their sequences; returns (N, H, D)."""
    cu, longest = packing.cu_seqlens, packing.max_seqlen
    if backend == "flash":
        if q.device.type != "cuda" or q.dtype not in HALF:
            raise ConfigError(
                "model.attention",
                backend,
                f"sdpa or math on {q.device.type}/{q.dtype} (flash-attn needs CUDA with fp16 or bf16; "
                "set train.precision=bf16)",
            )
        return flash_varlen()(q, k, v, cu, cu, longest, longest)
    if packing.uniform is not None:
        qs, ks, vs = (rearrange(t, "(s l) h d -> s h l d", l=packing.uniform) for t in (q, k, v))
        return rearrange(_dense(qs, ks, vs, None, backend), "s h l d -> (s l) h d")
    if backend == "sdpa" and q.is_cuda and q.dtype in HALF and (varlen := torch_varlen()) is not None:
        return varlen(q, k, v, cu, cu, longest, longest)
    slot, keep = _slots(packing, q.shape[0], q.device)
    qs, ks, vs = (_pad(t, slot, packing) for t in (q, k, v))
    out = rearrange(_dense(qs, ks, vs, keep, backend), "s h l d -> (s l) h d")
    return out.index_select(0, slot)
