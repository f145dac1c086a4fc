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
from torch.utils.data import get_worker_info

from maestro.data.transforms import scaled_values
from maestro.modalities import ModalitySpec


def item_tokens(item: dict[str, Any], specs: dict[str, ModalitySpec]) -> dict[str, int]:
    """Tokens per modality of one item: dates × band groups × grid²."""
    return {m: item[m].shape[0] * len(s.groups) * s.tokens_per_date for m, s in specs.items()}


def _zeros(shape: tuple[int, ...], dtype: type) -> tuple[torch.Tensor, np.ndarray]:
    """A zeroed batch buffer, as a tensor and a numpy view of it to fill.

    In a data-loader worker it lives in shared memory from the start, so the batch crosses to the
    main process without the copy torch would otherwise make (as torch's own default_collate does).
    """
    if get_worker_info() is None:
        a = np.zeros(shape, dtype)  # calloc: pages are zeroed by the kernel when first written
        return torch.from_numpy(a), a
    t = torch.from_numpy(np.empty(0, dtype))
    shared = torch.UntypedStorage._new_shared(int(np.prod(shape)) * t.element_size())  # zero-filled
    t = t.new_empty(0).set_(shared, 0, shape)
    return t, t.numpy()


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
    items: list[dict[str, Any]], specs: dict[str, ModalitySpec], targets: list[str]
) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    real = padded = 0
    for m, s in specs.items():
        lengths = [it[m].shape[0] for it in items]
        t = max(lengths)
        batch[m], x = _zeros((len(items), t, *items[0][m].shape[1:]), np.float32)  # (B, T, C, H, W)
        batch[f"{m}_dates"], d = _zeros((len(items), t, 3), np.int16)  # (B, T, 3)
        batch[f"{m}_valid"], v = _zeros((len(items), t, *items[0][m].shape[2:]), bool)  # (B, T, H, W)
        for b, it in enumerate(items):
            n = lengths[b]
            _put_values(x[b, :n], it, m, s)
            d[b, :n], v[b, :n] = it[f"{m}_dates"], it[f"{m}_valid"]
        batch[f"{m}_ndates"] = torch.tensor(lengths, dtype=torch.int64)
        per_date = len(s.groups) * s.tokens_per_date
        real += sum(lengths) * per_date
        padded += (t * len(items) - sum(lengths)) * per_date
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
) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    tokens = [item_tokens(it, specs) for it in items]
    for m, s in specs.items():
        lengths = [it[m].shape[0] for it in items]
        cu = np.cumsum([0, *lengths])
        batch[m], x = _zeros((1, cu[-1], *items[0][m].shape[1:]), np.float32)  # (1, ΣT, C, H, W)
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
