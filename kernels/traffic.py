"""Bytes each fused op moves through device memory, per pass: what `kernels/bench.py` divides by.

Counted from what the op really does, kernels and the torch calls around them: every element a kernel
loads or stores counts once per launch (loads masked off move nothing; sibling programs re-reading
the same index or mask-token rows are served by L2 and count once), and every buffer a torch call
fills, reduces or casts counts in full. Loads and stores at a finer grain than a 32-byte sector, and
cache misses, can only add to this, so GB/s and "% of copy bandwidth" derived from it are never
overstated. `tests/test_kernels_bench.py` checks every figure against an independent count of the
loads and stores the Triton interpreter executes.

Each function returns {"fwd", "bwd", "both"} in bytes; `both` is one forward then one backward.
"""

from __future__ import annotations

_INDEX = 8  # int64 row indices (source, token ids, gather indices)
_F32 = 4
# The loss forward's scalar tail: the summed error (f32), the summed count (int64), cast to f32 and
# scaled by C; its backward gets autograd's zero gradient (f32) for the non-differentiable count.
_LOSS_FWD_SCALARS = _F32 + 8 + (8 + _F32) + (_F32 + _F32)
_LOSS_BWD_SCALARS = _F32 + _F32  # that zero gradient, and the loss gradient each program loads


def _passes(fwd: int, bwd: int) -> dict[str, int]:
    return {"fwd": fwd, "bwd": bwd, "both": fwd + bwd}


def masked_loss(
    m: int, p: int, c: int, live: int, s_pred: int, s_target: int, programs: int
) -> dict[str, int]:
    """`group_norm_masked_loss` on M patches of P pixels × C channels: `live` pixels count (masked
    tokens' valid pixels; only theirs are read), `programs` the launch's grid. Both kernels read
    the whole valid mask (M·P bytes) and token mask (M bytes); the forward writes one f32 sum and
    one int32 count per program, summed by two torch reductions; the backward writes all of d pred."""
    masks = m * p + m
    data = live * c * (s_pred + s_target)
    partials = programs * (_F32 + 4)
    fwd = masks + data + 2 * partials + _LOSS_FWD_SCALARS  # partials written, then read back
    bwd = masks + data + m * p * c * s_pred + _LOSS_BWD_SCALARS
    return _passes(fwd, bwd)


def gather_rows(n: int, k: int, e: int, s: int) -> dict[str, int]:
    """`gather_rows` of K of N rows of E elements of s bytes. Backward: a zero (N, E) gradient, then
    the K gradient rows scattered into it."""
    fwd = k * _INDEX + 2 * k * e * s
    bwd = n * e * s + k * _INDEX + 2 * k * e * s
    return _passes(fwd, bwd)


def unmask_rows(
    n: int, k: int, e: int, s: int, tokens: int, tokens_used: int, programs: int, s_table: int
) -> dict[str, int]:
    """`unmask_rows` to N rows from K encoded rows and a (tokens, E) mask-token table of which
    `tokens_used` rows are taken; `programs` is the row-block count of the launch grid.

    Backward: a zero d enc (K, E); the kernel reads the output gradient once, writes d enc and, per
    row-block program, one f32 partial d table (tokens, E) — as large as the gradient itself at the
    presets' block sizes — which a torch sum reduces and a cast returns in the table's dtype."""
    fwd = 2 * n * _INDEX + k * e * s + tokens_used * e * s + n * e * s
    partial = programs * tokens * e * _F32
    bwd = k * e * s + 2 * n * _INDEX + n * e * s + k * e * s  # zero d enc, indices, d out, d enc
    bwd += partial + partial + tokens * e * _F32  # partials written, read by the sum, sum written
    bwd += tokens * e * (_F32 + s_table)  # the cast to the table's dtype
    return _passes(fwd, bwd)
