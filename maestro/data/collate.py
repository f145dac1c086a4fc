"""Items to model batches: padded `(B, T, ...)` batches, or packed batches under a token budget.

Every array of a batch (targets, dates and counts included) goes into one buffer
(`arena.py`), so a batch crosses processes and is pinned as one piece. Values go straight into
float32 batch buffers; raw items (`prepare.select`) are scaled on the way,
each value read once in its stored dtype and written once.

Padded: each modality's date axis is padded to the batch's longest series (only `dates: all`
series differ), padding flagged in `MOD_valid` and counted in `MOD_ndates (B,)`.

Packed (`data.token_budget > 0`): items are concatenated, not padded, along the date axis:
`MOD (1, ΣT, C, H, W)`, `MOD_dates (1, ΣT, 3)`, `MOD_valid (1, ΣT, H, W)`, with
`MOD_cu_dates (n+1,)` int32 the cumulative date counts per item; `cu_seqlens (n+1,)` int32 the
cumulative token counts per item (all modalities: what the loop counts); `ref_date (n, 1, 3)`. A batch takes items while they fit the budget;
the only padding is the unused tail of the budget, reported as `_padding_fraction`.

Keys starting with `_` (`_keys`, `_padding_fraction`, ...) are host-side bookkeeping: they never
go to the device. Targets (`TARGET (B, ...)`) are in a batch only when the recipe has them (an
evaluation's loader).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maestro.data.arena import Arena, Buffer, Layout, fresh
from maestro.data.transforms import scaled_values
from maestro.modalities import ModalitySpec


def item_tokens(item: dict[str, Any], specs: dict[str, ModalitySpec]) -> dict[str, int]:
    """Tokens per modality of one item: dates × band groups × grid²."""
    return {m: item[m].shape[0] * len(s.groups) * s.tokens_per_date for m, s in specs.items()}


def _buffers(layout: Layout, arena: Arena | None) -> dict[str, Buffer]:
    """Uninitialized batch arrays, all in one buffer: from the arena (reused memory) when there is
    one; collate writes every element, padding included."""
    return fresh(layout) if arena is None else arena.buffers(layout)


def _put_values(out: np.ndarray, item: dict[str, Any], name: str, spec: ModalitySpec) -> None:
    """An item's values into their batch slot: raw ones (with `MOD_hole`) are scaled on the way."""
    if f"{name}_hole" in item:
        scaled_values(item[name], item[f"{name}_hole"], spec, out=out)
    else:
        out[...] = item[name]


def _target_layout(items: list[dict[str, Any]], names: list[str]) -> Layout:
    """`(B, ...)` arrays for the targets every item has (an evaluation's; pretraining has none)."""
    return {
        name: ((len(items), *items[0][name].shape), items[0][name].dtype.type)
        for name in names
        if all(name in it for it in items)
    }


def _fill(batch: dict[str, Any], buffers: dict[str, Buffer], values: dict[str, Any]) -> None:
    """Small arrays computed beforehand into their place in the batch buffer."""
    for name, value in values.items():
        batch[name], out = buffers[name]
        out[...] = value


def collate_padded(
    items: list[dict[str, Any]],
    specs: dict[str, ModalitySpec],
    targets: list[str],
    arena: Arena | None = None,
) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    real = padded = 0
    n_items = len(items)
    lengths = {m: [it[m].shape[0] for it in items] for m in specs}
    layout: Layout = {}
    small: dict[str, Any] = {}
    for m in specs:
        t, shape = max(lengths[m]), items[0][m].shape
        layout[m] = (n_items, t, *shape[1:]), np.float32  # (B, T, C, H, W)
        layout[f"{m}_dates"] = (n_items, t, 3), np.int16  # (B, T, 3)
        layout[f"{m}_valid"] = (n_items, t, *shape[2:]), bool  # (B, T, H, W)
        layout[f"{m}_ndates"] = (n_items,), np.int64  # (B,)
        small[f"{m}_ndates"] = lengths[m]
    layout["ref_date"] = (n_items, 1, 3), np.int16  # (B, 1, 3)
    small["ref_date"] = [it["ref_date"] for it in items]
    tlayout = _target_layout(items, targets)
    layout.update(tlayout)
    small.update({name: [it[name] for it in items] for name in tlayout})
    buffers = _buffers(layout, arena)
    for m, s in specs.items():
        batch[m], x = buffers[m]
        batch[f"{m}_dates"], d = buffers[f"{m}_dates"]
        batch[f"{m}_valid"], v = buffers[f"{m}_valid"]
        t = x.shape[1]
        for b, it in enumerate(items):
            n = lengths[m][b]
            _put_values(x[b, :n], it, m, s)
            d[b, :n], v[b, :n] = it[f"{m}_dates"], it[f"{m}_valid"]
            x[b, n:], d[b, n:], v[b, n:] = 0, 0, False
        per_date = len(s.groups) * s.tokens_per_date
        real += sum(lengths[m]) * per_date
        padded += (t * n_items - sum(lengths[m])) * per_date
    _fill(batch, buffers, small)
    batch["_keys"] = [it["_key"] for it in items]
    batch["_padding_fraction"] = padded / max(1, real + padded)
    return batch


def collate_packed(
    items: list[dict[str, Any]],
    specs: dict[str, ModalitySpec],
    targets: list[str],
    budget: int,
    arena: Arena | None = None,
) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    n_items = len(items)
    tokens = [sum(item_tokens(it, specs).values()) for it in items]
    cus = {m: np.cumsum([0, *(it[m].shape[0] for it in items)]) for m in specs}
    layout: Layout = {}
    small: dict[str, Any] = {}
    for m in specs:
        total, shape = int(cus[m][-1]), items[0][m].shape
        layout[m] = (1, total, *shape[1:]), np.float32  # (1, ΣT, C, H, W)
        layout[f"{m}_dates"] = (1, total, 3), np.int16  # (1, ΣT, 3)
        layout[f"{m}_valid"] = (1, total, *shape[2:]), bool  # (1, ΣT, H, W)
        layout[f"{m}_cu_dates"] = (n_items + 1,), np.int32
        small[f"{m}_cu_dates"] = cus[m]
    layout["cu_seqlens"] = (n_items + 1,), np.int32
    small["cu_seqlens"] = np.cumsum([0, *tokens])
    layout["ref_date"] = (n_items, 1, 3), np.int16  # (n, 1, 3)
    small["ref_date"] = [it["ref_date"] for it in items]
    tlayout = _target_layout(items, targets)
    layout.update(tlayout)
    small.update({name: [it[name] for it in items] for name in tlayout})
    buffers = _buffers(layout, arena)
    for m, s in specs.items():
        batch[m], x = buffers[m]  # every date of every item fills these: nothing to pad
        batch[f"{m}_dates"], d = buffers[f"{m}_dates"]
        batch[f"{m}_valid"], v = buffers[f"{m}_valid"]
        for it, a, b in zip(items, cus[m][:-1], cus[m][1:]):
            _put_values(x[0, a:b], it, m, s)
            d[0, a:b], v[0, a:b] = it[f"{m}_dates"], it[f"{m}_valid"]
    _fill(batch, buffers, small)
    batch["_keys"] = [it["_key"] for it in items]
    used = int(small["cu_seqlens"][-1])
    batch["_padding_fraction"] = (budget - used) / budget
    return batch
