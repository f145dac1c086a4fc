"""Patch-group-normalized reconstruction targets and the masked reconstruction loss.

MAESTRO normalizes each target patch per date and per `norm_bands` group of channels:
`t̂ = (t − μ) / sqrt(σ² + eps)`, with μ and the *unbiased* σ² taken over the group's pixels × channels
(maestro_reference.md §3). The loss is the L1 or L2 error on masked tokens' valid pixels.

Shapes: `M` patches (B·N·L flattened, one per token), `P` pixels per patch (p²), `C` channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.device import check_launchable


def group_norm_target_ref(
    target: Tensor, groups: Sequence[int], valid: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """Pure-torch reference. target (M, P, C); groups: channel-group sizes summing to C;
    valid (M, P) bool or None (pixels that count in the statistics). Returns (M, P, C) float32.

    Statistics use only valid pixels; a group with fewer than two valid values gets variance 0
    (the reference would divide by zero). Invalid pixels come out as 0.
    """
    t = target.float()
    if valid is None:
        valid = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
    v = valid.unsqueeze(-1).float()  # (M, P, 1)
    t = torch.where(valid.unsqueeze(-1), t, 0.0)  # NaN or garbage at invalid pixels never propagates
    out = []
    for tg in torch.split(t, list(groups), dim=-1):  # (M, P, c_g)
        n = v.sum(dim=1, keepdim=True) * tg.shape[-1]  # (M, 1, 1) values per (patch, group)
        mean = (tg * v).sum(dim=(1, 2), keepdim=True) / n.clamp_min(1)
        var = (((tg - mean) * v) ** 2).sum(dim=(1, 2), keepdim=True) / (n - 1).clamp_min(1)
        out.append((tg - mean) * torch.rsqrt(var + eps) * v)
    return torch.cat(out, dim=-1)


def masked_loss_ref(pred: Tensor, target: Tensor, mask: Tensor, kind: str = "l1") -> tuple[Tensor, Tensor]:
    """Pure-torch reference. pred, target (M, P, C); mask (M, P) bool: pixels that count (masked
    token and valid pixel). Returns (sum of per-element errors, number of elements) as float32
    scalars; the mean is their ratio. No host synchronization."""
    # Zero the difference (not only the error) off the mask: NaN at uncounted pixels must reach neither
    # the sum nor, through `d * d`, the gradient.
    d = torch.where(mask.unsqueeze(-1), pred.float() - target.float(), 0.0)
    total = (d.abs() if kind == "l1" else d * d).sum()
    count = mask.sum().float() * pred.shape[-1]
    return total, count


def group_norm_masked_loss_ref(
    pred: Tensor,
    target: Tensor,
    groups: Sequence[int] | None,
    valid: Tensor | None,
    token_mask: Tensor,
    kind: str = "l1",
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Normalize `target` per patch group (skipped when `groups` is None: raw targets), then the
    masked loss over masked tokens (token_mask (M,) bool) × valid pixels (valid (M, P) or None)."""
    if valid is None:
        valid = torch.ones(target.shape[:2], dtype=torch.bool, device=target.device)
    t = target.float() if groups is None else group_norm_target_ref(target, groups, valid, eps)
    return masked_loss_ref(pred, t, valid & token_mask.unsqueeze(-1), kind)


# --- Triton kernels -------------------------------------------------------------------------------------
# One program holds BLOCK_M whole patches as a (BLOCK_M, BLOCK_P, BLOCK_C) register tile, so every
# statistic is a reduction over the tile and each pixel is read from memory once. Channel groups enter
# as a bit mask `starts` (bit c set: a new group starts at channel c), a scalar argument: no device
# copy of the group table, no host synchronization.

_TILE = 2048  # elements per program: 16 per thread at 4 warps, no spills; one aerial 20×20×4 patch


@triton.jit
def _patch_tile(
    target_ptr, valid_ptr, tmask_ptr, M, P, C, starts, eps,
    HAS_VALID: tl.constexpr, HAS_TMASK: tl.constexpr, NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Loads BLOCK_M patches, returns (values (BM, BP, BC) f32, live (BM, BP, BC), in-bounds, offsets).

    `live`: elements that count (valid pixel, real channel, and masked token when HAS_TMASK). Values are
    the group-normalized targets when NORM, raw targets otherwise; 0 wherever not live."""
    m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BM,)
    p = tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    pix = (m[:, None] < M) & (p[None, :] < P)  # (BM, BP)
    inb = pix[:, :, None] & (c[None, None, :] < C)  # (BM, BP, BC)
    offs = (m[:, None, None] * P + p[None, :, None]) * C + c[None, None, :]
    live_pix = pix
    if HAS_VALID:
        live_pix &= tl.load(valid_ptr + m[:, None] * P + p[None, :], mask=pix, other=0) != 0
    if HAS_TMASK:
        live_pix &= (tl.load(tmask_ptr + m, mask=m < M, other=0) != 0)[:, None]
    live = live_pix[:, :, None] & (c[None, None, :] < C)
    x = tl.load(target_ptr + offs, mask=live, other=0.0).to(tl.float32)  # upcast first (bf16)
    if NORM:
        gid = tl.cumsum((starts >> c) & 1, 0)  # (BC,) group id of each channel
        real = c < C
        same = ((gid[:, None] == gid[None, :]) & real[:, None] & real[None, :]).to(tl.float32)  # (BC, BC)
        n = tl.sum(live_pix.to(tl.float32), axis=1)[:, None] * tl.sum(same, axis=0)[None, :]  # (BM, BC)
        gsum = tl.sum(tl.sum(x, axis=1)[:, :, None] * same[None, :, :], axis=1)  # (BM, BC) group sums
        mean = gsum / tl.maximum(n, 1.0)
        d = tl.where(live, x - mean[:, None, :], 0.0)
        gsq = tl.sum(tl.sum(d * d, axis=1)[:, :, None] * same[None, :, :], axis=1)
        var = gsq / tl.maximum(n - 1.0, 1.0)  # unbiased, as the reference
        x = d * tl.rsqrt(var + eps)[:, None, :]
    return x, live, inb, offs


@triton.jit
def _group_norm_target_kernel(
    target_ptr, valid_ptr, out_ptr, M, P, C, starts, eps,
    HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    y, _live, inb, offs = _patch_tile(
        target_ptr, valid_ptr, valid_ptr, M, P, C, starts, eps,
        HAS_VALID, False, True, BLOCK_M, BLOCK_P, BLOCK_C,
    )  # fmt: skip
    tl.store(out_ptr + offs, y, mask=inb)


@triton.jit
def _masked_loss_fwd_kernel(
    pred_ptr, target_ptr, valid_ptr, tmask_ptr, sum_ptr, count_ptr, M, P, C, starts, eps,
    HAS_VALID: tl.constexpr, NORM: tl.constexpr, L2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per program: the error summed over live elements, and the number of live pixels. Unmasked
    tokens are never read (their loads are masked off)."""
    y, live, _inb, offs = _patch_tile(
        target_ptr, valid_ptr, tmask_ptr, M, P, C, starts, eps,
        HAS_VALID, True, NORM, BLOCK_M, BLOCK_P, BLOCK_C,
    )  # fmt: skip
    d = tl.load(pred_ptr + offs, mask=live, other=0.0).to(tl.float32) - y
    e = d * d if L2 else tl.abs(d)
    pid = tl.program_id(0)
    tl.store(sum_ptr + pid, tl.sum(tl.sum(tl.sum(tl.where(live, e, 0.0), axis=2), axis=1), axis=0))
    live_pix = tl.max(live.to(tl.int32), axis=2)  # (BM, BP)
    tl.store(count_ptr + pid, tl.sum(tl.sum(live_pix, axis=1), axis=0))


@triton.jit
def _masked_loss_bwd_kernel(
    grad_ptr, pred_ptr, target_ptr, valid_ptr, tmask_ptr, dpred_ptr, M, P, C, starts, eps,
    HAS_VALID: tl.constexpr, NORM: tl.constexpr, L2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """d pred = g · sign(pred − t̂) (l1) or 2g · (pred − t̂) (l2) on live elements, 0 elsewhere; t̂ is
    recomputed from the target rather than stored by the forward."""
    y, live, inb, offs = _patch_tile(
        target_ptr, valid_ptr, tmask_ptr, M, P, C, starts, eps,
        HAS_VALID, True, NORM, BLOCK_M, BLOCK_P, BLOCK_C,
    )  # fmt: skip
    g = tl.load(grad_ptr).to(tl.float32)
    d = tl.load(pred_ptr + offs, mask=live, other=0.0).to(tl.float32) - y
    if L2:
        dp = 2.0 * (g * d)
    else:
        dp = g * tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    dp = tl.where(live, dp, 0.0)
    tl.store(dpred_ptr + offs, dp.to(dpred_ptr.dtype.element_ty), mask=inb)


# --- launch ----------------------------------------------------------------------------------------------


def _group_starts(groups: Sequence[int], channels: int) -> int:
    """Bit mask of the channels where a group starts (channel 0 excluded)."""
    if sum(groups) != channels or min(groups) < 1:
        raise ValueError(f"channel groups {list(groups)} must be positive and sum to the {channels} channels")
    if channels > 62:
        raise ValueError(f"{channels} channels: the fused kernel handles at most 62 per patch")
    starts, c = 0, 0
    for size in groups[:-1]:
        c += size
        starts |= 1 << c
    return starts


def _blocks(m: int, p: int, c: int) -> dict[str, int]:
    bp, bc = triton.next_power_of_2(p), triton.next_power_of_2(c)
    bm = max(1, min(triton.next_power_of_2(m), _TILE // (bp * bc)))
    return {"BLOCK_M": bm, "BLOCK_P": bp, "BLOCK_C": bc, "num_warps": 4 if bm * bp * bc <= _TILE else 8}


def _check(target: Tensor, valid: Tensor | None) -> None:
    check_launchable(_patch_tile, target)
    if target.dim() != 3:
        raise ValueError(f"target must be (M, P, C), got shape {tuple(target.shape)}")
    if valid is not None and (valid.shape != target.shape[:2] or valid.dtype != torch.bool):
        raise ValueError(
            f"valid must be bool (M, P) = {tuple(target.shape[:2])}, got {valid.dtype} {tuple(valid.shape)}"
        )


def _as_bytes(mask: Tensor | None, like: Tensor) -> Tensor:
    """A bool mask as uint8 without a copy (an unused pointer when None)."""
    return like if mask is None else mask.contiguous().view(torch.uint8)


class _GroupNormTarget(torch.autograd.Function):
    @staticmethod
    def forward(ctx, target, groups, valid, eps):
        _check(target, valid)
        m, p, c = target.shape
        x = target.contiguous()
        out = torch.empty(target.shape, dtype=torch.float32, device=target.device)
        blocks = _blocks(m, p, c)
        if m:
            grid = (triton.cdiv(m, blocks["BLOCK_M"]),)
            _group_norm_target_kernel[grid](
                x, _as_bytes(valid, x), out, m, p, c, _group_starts(groups, c), eps,
                HAS_VALID=valid is not None, **blocks,
            )  # fmt: skip
        ctx.save_for_backward(target, valid)
        ctx.groups, ctx.eps = groups, eps
        return out

    @staticmethod
    def backward(ctx, grad):
        # Targets are data and never need this in training; kept exact through the reference.
        target, valid = ctx.saved_tensors
        with torch.enable_grad():
            t = target.detach().requires_grad_()
            (g,) = torch.autograd.grad(group_norm_target_ref(t, ctx.groups, valid, ctx.eps), t, grad)
        return g, None, None, None


def group_norm_target(
    target: Tensor, groups: Sequence[int], valid: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """Fused `group_norm_target_ref`: same signature, semantics and float32 output; reads pixels once."""
    return _GroupNormTarget.apply(target, groups, valid, eps)


class _GroupNormMaskedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, groups, valid, token_mask, kind, eps):
        _check(target, valid)
        if (
            pred.shape != target.shape
            or token_mask.shape != target.shape[:1]
            or token_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"pred {tuple(pred.shape)} must equal target {tuple(target.shape)} and token_mask "
                f"({token_mask.dtype} {tuple(token_mask.shape)}) must be bool (M,) = ({target.shape[0]},)"
            )
        if kind not in ("l1", "l2"):
            raise ValueError(f"loss kind {kind!r}: expected 'l1' or 'l2'")
        if target.requires_grad:
            raise ValueError("targets are data: pass target.detach() (no gradient flows to the target)")
        m, p, c = target.shape
        ctx.meta = dict(
            M=m, P=p, C=c, starts=0 if groups is None else _group_starts(groups, c), eps=eps,
            HAS_VALID=valid is not None, NORM=groups is not None, L2=kind == "l2", **_blocks(m, p, c),
        )  # fmt: skip
        pred, target = pred.contiguous(), target.contiguous()
        grid = (triton.cdiv(m, ctx.meta["BLOCK_M"]),)
        sums = torch.empty(grid[0], dtype=torch.float32, device=pred.device)
        counts = torch.empty(grid[0], dtype=torch.int32, device=pred.device)
        if m:
            _masked_loss_fwd_kernel[grid](
                pred, target, _as_bytes(valid, target), _as_bytes(token_mask, target), sums, counts,
                **ctx.meta,
            )  # fmt: skip
        ctx.save_for_backward(pred, target, valid, token_mask)
        count = counts.sum().float() * c
        ctx.mark_non_differentiable(count)
        return sums.sum(), count

    @staticmethod
    def backward(ctx, grad_sum, _grad_count):
        pred, target, valid, token_mask = ctx.saved_tensors
        dpred = torch.empty_like(pred)
        m = ctx.meta["M"]
        if m:
            _masked_loss_bwd_kernel[(triton.cdiv(m, ctx.meta["BLOCK_M"]),)](
                grad_sum.float().contiguous(), pred, target, _as_bytes(valid, target),
                _as_bytes(token_mask, target), dpred, **ctx.meta,
            )  # fmt: skip
        return dpred, None, None, None, None, None, None


def group_norm_masked_loss(
    pred: Tensor,
    target: Tensor,
    groups: Sequence[int] | None,
    valid: Tensor | None,
    token_mask: Tensor,
    kind: str = "l1",
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Fused `group_norm_masked_loss_ref`: reads each masked token's target and prediction once,
    normalizes in registers and accumulates the error; returns (sum, count) float32 scalars. The
    backward recomputes the normalized target and writes d pred (in pred's dtype)."""
    return _GroupNormMaskedLoss.apply(pred, target, groups, valid, token_mask, kind, eps)
