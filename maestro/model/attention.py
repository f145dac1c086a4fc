"""Multi-head attention backends over padded batches and packed variable-length sequences.

Tokens travel as rows `(N, H, D)` with a `Packing` that says where each sequence starts
(`cu_seqlens`, as flash-attn's varlen API). When every sequence has the same length the rows are a
padded batch in disguise, and each backend takes its fast dense path; otherwise:
- `flash`: `flash_attn_varlen_func` (CUDA, fp16/bf16);
- `sdpa`: the rows are scattered into a `(S, L_max)` padded batch with a key-padding mask;
- `math`: the same padding, then `softmax(QKᵀ·D^-½)·V` written out (the readable reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from maestro.errors import ConfigError

BACKENDS = ("flash", "sdpa", "math")


@dataclass(frozen=True)
class Packing:
    """Sequence boundaries of a set of rows: `cu_seqlens` (S+1,) int32 starting at 0, `max_seqlen`
    the longest sequence; `uniform` the common length when all sequences have it (None otherwise)."""

    cu_seqlens: Tensor
    max_seqlen: int
    uniform: int | None = None

    @staticmethod
    def dense(num_seqs: int, length: int, device: torch.device) -> Packing:
        """`num_seqs` sequences of `length` rows each (a padded batch flattened to rows)."""
        cu = torch.arange(num_seqs + 1, device=device, dtype=torch.int32) * length
        return Packing(cu, length, length)

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
        return Packing(cu, longest, longest if min(lengths, default=0) == longest else None)

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1


def check_backend(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise a ConfigError if `model.attention=name` cannot run on this device and dtype."""
    if name not in BACKENDS:
        raise ConfigError("model.attention", name, f"one of {BACKENDS}")
    if name != "flash":
        return
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        raise ConfigError(
            "model.attention",
            name,
            f"sdpa or math on {device.type}/{dtype} (flash-attn needs CUDA with fp16 or bf16; "
            "set train.precision=bf16)",
        )
    try:
        import flash_attn  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "model.attention", name, "sdpa or math (flash-attn is not installed: pip install flash-attn)"
        ) from e


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
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        cu = packing.cu_seqlens
        return flash_attn_varlen_func(q, k, v, cu, cu, packing.max_seqlen, packing.max_seqlen)
    if packing.uniform is not None:
        qs, ks, vs = (rearrange(t, "(s l) h d -> s h l d", l=packing.uniform) for t in (q, k, v))
        return rearrange(_dense(qs, ks, vs, None, backend), "s h l d -> (s l) h d")
    slot, keep = _slots(packing, q.shape[0], q.device)
    qs, ks, vs = (_pad(t, slot, packing) for t in (q, k, v))
    out = rearrange(_dense(qs, ks, vs, keep, backend), "s h l d -> (s l) h d")
    return out.index_select(0, slot)
