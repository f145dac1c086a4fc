"""Masking data movement: gather the visible tokens, and the un-masking scatter.

Both padded batches `(B, L, E)` and packed batches `(ΣL, E)` reduce to flat rows: a padded batch is
flattened with row offsets `b·L`, so one row-level op serves both.
"""

from __future__ import annotations

from torch import Tensor


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
