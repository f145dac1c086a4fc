"""Masking data movement: gather the visible tokens, and the un-masking scatter.

Both padded batches `(B, L, E)` and packed batches `(ΣL, E)` reduce to flat rows: a padded batch is
flattened with row offsets `b·L`, so one row-level op serves both.

The fused ops assume what masking guarantees: `gather_rows` indices are distinct, and each `enc` row
of `unmask_rows` is the source of at most one position. Their backwards are then plain scatters
(no atomics); the mask-token gradient is reduced per token id in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.device import check_launchable


def gather_rows_ref(x: Tensor, index: Tensor) -> Tensor:
    """Pure-torch reference. x (N, E), index (K,) int64 -> (K, E) with out[k] = x[index[k]]."""
    return x.index_select(0, index)


def unmask_rows_ref(enc: Tensor, source: Tensor, table: Tensor, token_id: Tensor) -> Tensor:
    """Pure-torch reference. enc (K, E) encoded visible tokens; source (N,) int64: row of `enc` for a
    visible position, -1 for a masked one; table (T, E) mask tokens; token_id (N,) int64: which mask
    token each position takes when masked. Returns (N, E):
    out[j] = enc[source[j]] if source[j] >= 0 else table[token_id[j]]."""
    visible = (source >= 0).unsqueeze(-1)
    from_enc = enc.index_select(0, source.clamp_min(0))
    from_table = table.index_select(0, token_id)
    return from_enc.where(visible, from_table.to(enc.dtype))


# --- Triton kernels -------------------------------------------------------------------------------------
# Programs tile (BLOCK_R rows, BLOCK_E columns); row indices are loaded first, then used as offsets.

_TILE = 2048  # elements per program: 16 per thread at 4 warps; 64-bit row offsets keep registers busy


@triton.jit
def _gather_rows_kernel(x_ptr, index_ptr, out_ptr, K, E, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    k = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # (BR,)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # (BE,)
    inb = (k[:, None] < K) & (e[None, :] < E)
    row = tl.load(index_ptr + k, mask=k < K, other=0).to(tl.int64)
    vals = tl.load(x_ptr + row[:, None] * E + e[None, :], mask=inb)
    tl.store(out_ptr + k[:, None] * E + e[None, :], vals, mask=inb)


@triton.jit
def _scatter_rows_kernel(src_ptr, dest_ptr, out_ptr, R, E, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[dest[r]] = src[r] for every r with dest[r] >= 0 (destinations distinct)."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    dest = tl.load(dest_ptr + r, mask=r < R, other=-1).to(tl.int64)
    inb = (dest[:, None] >= 0) & (e[None, :] < E)
    vals = tl.load(src_ptr + r[:, None] * E + e[None, :], mask=inb)
    tl.store(out_ptr + dest[:, None] * E + e[None, :], vals, mask=inb)


@triton.jit
def _unmask_rows_kernel(
    enc_ptr, source_ptr, table_ptr, token_ptr, out_ptr, N, E,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    n = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    inb = (n[:, None] < N) & (e[None, :] < E)
    src = tl.load(source_ptr + n, mask=n < N, other=-1).to(tl.int64)
    tok = tl.load(token_ptr + n, mask=n < N, other=0).to(tl.int64)
    visible = (src >= 0)[:, None]
    from_enc = tl.load(enc_ptr + src[:, None] * E + e[None, :], mask=inb & visible)
    from_table = tl.load(table_ptr + tok[:, None] * E + e[None, :], mask=inb & ~visible)
    tl.store(out_ptr + n[:, None] * E + e[None, :], tl.where(visible, from_enc, from_table), mask=inb)


@triton.jit
def _unmask_rows_bwd_kernel(
    grad_ptr, source_ptr, token_ptr, genc_ptr, gtable_ptr, N, E, T,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Reads the output gradient once: visible rows go to their `enc` row; masked rows are summed per
    token id in float32 into this program's slot of the partial table gradient (T, E)."""
    n = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    inb = (n[:, None] < N) & (e[None, :] < E)
    src = tl.load(source_ptr + n, mask=n < N, other=-1).to(tl.int64)
    tok = tl.load(token_ptr + n, mask=n < N, other=0)
    g = tl.load(grad_ptr + n[:, None] * E + e[None, :], mask=inb, other=0.0)
    visible = (src >= 0)[:, None]
    tl.store(genc_ptr + src[:, None] * E + e[None, :], g, mask=inb & visible)
    gf = tl.where(inb & ~visible, g.to(tl.float32), 0.0)  # upcast before any arithmetic (bf16)
    slot = gtable_ptr + tl.program_id(0).to(tl.int64) * T * E + e
    for t in range(T):
        tl.store(slot + t * E, tl.sum(tl.where((tok == t)[:, None], gf, 0.0), axis=0), mask=e < E)


# --- launch ----------------------------------------------------------------------------------------------


def _grid(rows: int, width: int) -> tuple[tuple[int, int], dict[str, int]]:
    be = min(triton.next_power_of_2(width), 256)
    br = max(1, min(triton.next_power_of_2(max(rows, 1)), _TILE // be))
    return (triton.cdiv(rows, br), triton.cdiv(width, be)), {"BLOCK_R": br, "BLOCK_E": be}


def _check_rows(name: str, rows: Tensor, length: int) -> Tensor:
    check_launchable(_gather_rows_kernel, rows)
    if rows.dim() != 1 or rows.shape[0] != length or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name} must be an int32/int64 vector of length {length}, got {rows.dtype} {tuple(rows.shape)}"
        )
    return rows.contiguous()


def _scatter_rows(src: Tensor, dest: Tensor, rows: int) -> Tensor:
    """(rows, E) zeros with src[r] written at row dest[r] (dest < 0: dropped)."""
    out = torch.zeros((rows, src.shape[1]), dtype=src.dtype, device=src.device)
    if src.numel():
        grid, blocks = _grid(*src.shape)
        _scatter_rows_kernel[grid](src.contiguous(), dest, out, src.shape[0], src.shape[1], **blocks)
    return out


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index):
        if x.dim() != 2:
            raise ValueError(
                f"x must be (N, E) rows (flatten a padded (B, L, E) batch), got {tuple(x.shape)}"
            )
        index = _check_rows("index", index, index.shape[0] if index.dim() == 1 else -1)
        x = x.contiguous()
        out = torch.empty((index.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
        if out.numel():
            grid, blocks = _grid(*out.shape)
            _gather_rows_kernel[grid](x, index, out, out.shape[0], out.shape[1], **blocks)
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return _scatter_rows(grad, index, ctx.rows), None


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """Fused `gather_rows_ref` (distinct indices): (N, E), (K,) -> (K, E); backward scatters the
    gradient rows into a zero (N, E)."""
    return _GatherRows.apply(x, index)


class _UnmaskRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, enc, source, table, token_id):
        if enc.dim() != 2 or table.dim() != 2 or table.shape[1] != enc.shape[1]:
            raise ValueError(
                f"enc (K, E) and table (T, E) must share E, got {tuple(enc.shape)} and {tuple(table.shape)}"
            )
        n = source.shape[0] if source.dim() == 1 else -1
        source, token_id = _check_rows("source", source, n), _check_rows("token_id", token_id, n)
        enc = enc.contiguous()
        out = torch.empty((n, enc.shape[1]), dtype=enc.dtype, device=enc.device)
        if out.numel():
            grid, blocks = _grid(*out.shape)
            table_e = table.to(enc.dtype).contiguous()  # (T, E): a few rows, cast once on the host side
            _unmask_rows_kernel[grid](enc, source, table_e, token_id, out, n, enc.shape[1], **blocks)
        ctx.save_for_backward(source, token_id)
        ctx.enc_rows, ctx.table_rows, ctx.table_dtype = enc.shape[0], table.shape[0], table.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        source, token_id = ctx.saved_tensors
        n, width = grad.shape
        t = ctx.table_rows
        genc = torch.zeros((ctx.enc_rows, width), dtype=grad.dtype, device=grad.device)
        grid, blocks = _grid(n, width)
        # Every program writes its whole (T, E) slot: no zero fill needed.
        partial = torch.empty((grid[0], t, width), dtype=torch.float32, device=grad.device)
        if grad.numel():
            _unmask_rows_bwd_kernel[grid](
                grad.contiguous(), source, token_id, genc, partial, n, width, t, **blocks
            )
        return genc, None, partial.sum(0).to(ctx.table_dtype), None


def unmask_rows(enc: Tensor, source: Tensor, table: Tensor, token_id: Tensor) -> Tensor:
    """Fused `unmask_rows_ref` (each enc row used at most once): (K, E), (N,), (T, E), (N,) -> (N, E)
    in enc's dtype. Backward: d enc by scatter, d table summed per token id in float32."""
    return _UnmaskRows.apply(enc, source, table, token_id)
