"""Items to model batches: padded `(B, T, ...)` batches, or packed batches under a token budget.

Values go straight into float32 batch buffers; raw items (`prepare.select`) are scaled on the way,
each value read once in its stored dtype and written once.

Padded: each modality's date axis is padded to the batch's longest series (only `dates: all`
series differ), padding flagged in `MOD_valid` and counted in `MOD_ndates (B,)`.

Packed (`data.token_budget > 0`): items are concatenated, not padded, along the date axis:
`MOD (1, ΣT, C, H, W)`, `MOD_dates (1, ΣT, 3)`, `MOD_valid (1, ΣT, H, W)`, with
`MOD_cu_dates (n+1,)` int32 the cumulative date counts per item; `cu_seqlens (n+1,)` int32 the
cumulative token counts per item (all modalities) and `cu_seqlens_GROUP` per fusion group, as
varlen attention takes them; `ref_date (n, 1, 3)`. A batch takes items while they fit the budget;
the only padding is the unused tail of the budget, reported as `_padding_fraction`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from maestro.data.arena import Arena, Buffer, Layout, fresh
from maestro.data.transforms import scaled_values
from maestro.modalities import ModalitySpec


def item_tokens(item: dict[str, Any], specs: dict[str, ModalitySpec]) -> dict[str, int]:
    """Tokens per modality of one item: dates × band groups × grid²."""
    return {m: item[m].shape[0] * len(s.groups) * s.tokens_per_date for m, s in specs.items()}


def _buffers(layout: Layout, arena: Arena | None) -> dict[str, Buffer]:
    """Uninitialized batch arrays: from the arena (reused memory) when there is one; collate
    writes every element, padding included."""
    return fresh(layout) if arena is None else arena.buffers(layout)


def _put_values(out: np.ndarray, item: dict[str, Any], name: str, spec: ModalitySpec) -> None:
    """An item's values into their batch slot: raw ones (with `MOD_hole`) are scaled on the way."""
    if f"{name}_hole" in item:
        scaled_values(item[name], item[f"{name}_hole"], spec, out=out)
    else:
        out[...] = item[name]


def _stack_targets(items: list[dict[str, Any]], names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        if all(name in it for it in items):
            out[name] = torch.from_numpy(np.stack([it[name] for it in items]))
    return out


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
    for m in specs:
        t, shape = max(lengths[m]), items[0][m].shape
        layout[m] = (n_items, t, *shape[1:]), np.float32  # (B, T, C, H, W)
        layout[f"{m}_dates"] = (n_items, t, 3), np.int16  # (B, T, 3)
        layout[f"{m}_valid"] = (n_items, t, *shape[2:]), bool  # (B, T, H, W)
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
        batch[f"{m}_ndates"] = torch.tensor(lengths[m], dtype=torch.int64)
        per_date = len(s.groups) * s.tokens_per_date
        real += sum(lengths[m]) * per_date
        padded += (t * n_items - sum(lengths[m])) * per_date
    batch["ref_date"] = torch.from_numpy(np.stack([it["ref_date"] for it in items]))
    batch.update(_stack_targets(items, targets))
    batch["_keys"] = [it["_key"] for it in items]
    batch["_padding_fraction"] = padded / max(1, real + padded)
    return batch


def collate_packed(
    items: list[dict[str, Any]],
    specs: dict[str, ModalitySpec],
    groups: dict[str, list[str]],
    targets: list[str],
    budget: int,
    arena: Arena | None = None,
) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    tokens = [item_tokens(it, specs) for it in items]
    cus = {m: np.cumsum([0, *(it[m].shape[0] for it in items)]) for m in specs}
    layout: Layout = {
        m: ((1, int(cus[m][-1]), *items[0][m].shape[1:]), np.float32) for m in specs
    }  # (1, ΣT, C, H, W)
    buffers = _buffers(layout, arena)
    for m, s in specs.items():
        cu = cus[m]
        batch[m], x = buffers[m]  # every date of every item fills it: nothing to pad
        for it, a, b in zip(items, cu[:-1], cu[1:]):
            _put_values(x[0, a:b], it, m, s)
        batch[f"{m}_dates"] = torch.from_numpy(np.concatenate([it[f"{m}_dates"] for it in items])[None])
        batch[f"{m}_valid"] = torch.from_numpy(np.concatenate([it[f"{m}_valid"] for it in items])[None])
        batch[f"{m}_cu_dates"] = torch.tensor(cu, dtype=torch.int32)
    batch["cu_seqlens"] = torch.tensor(np.cumsum([0, *(sum(t.values()) for t in tokens)]), dtype=torch.int32)
    for g, mods in groups.items():
        per_item = [sum(t[m] for m in mods) for t in tokens]
        batch[f"cu_seqlens_{g}"] = torch.tensor(np.cumsum([0, *per_item]), dtype=torch.int32)
    batch["ref_date"] = torch.from_numpy(np.stack([it["ref_date"] for it in items]))
    batch.update(_stack_targets(items, targets))
    batch["_keys"] = [it["_key"] for it in items]
    used = int(batch["cu_seqlens"][-1])
    batch["_padding_fraction"] = (budget - used) / budget
    return batch
