"""Padded batches as packed rows at the model's entry, and the model's outputs back to them.

A padded batch (`maestro.data.collate.collate_padded`) holds per modality `MOD (B, T, C, H, W)`,
`MOD_dates (B, T, 3)`, optionally `MOD_valid (B, T, H, W)`, and `MOD_ndates (B,)` the real dates of
each sample, at the start of its series (absent: all T dates are real); `ref_date (B, 1, 3)`. At the
model's entry its real dates become a packed batch (`maestro.model.packed`), so padding never
reaches attention, the masks or the loss, and each sample gets exactly what it gets alone.
Outputs go back to the padded layouts: padding dates hold zeros (targets, reconstructions,
encodings), are invalid, and their tokens count as masked (True) in the masks.

Where nothing is padded (every sample holds all T dates) packing and unpacking are views.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from maestro.modalities import ModalitySpec

INPUTS = ("", "_dates", "_valid")  # suffixes of the per-modality inputs the model reads


def _rows(x: Tensor, rows: Tensor | None) -> Tensor:
    """(B, T, ...) -> (ΣT, ...): the rows `rows` of the flattened leading axes (all when None)."""
    flat = x.flatten(0, 1)
    return flat if rows is None else flat.index_select(0, rows)


def _place(x: Tensor, rows: Tensor | None, size: int, fill) -> Tensor:
    """(Σ, ...) -> (size, ...): `x` at `rows`, `fill` elsewhere (x itself when rows is None)."""
    if rows is None:
        return x
    return x.new_full((size, *x.shape[1:]), fill).index_copy(0, rows, x)


@dataclass(frozen=True)
class Padding:
    """Where the real dates and tokens of a padded batch sit. Per modality: `dates` T, `counts` the
    real dates per sample, `date_rows` (ΣT_i,) the rows `b·T + t` of the real dates in (B·T),
    `token_rows` (Σ_i G·T_i·L,) the positions of their tokens in (B·G·T·L) sample after sample; per
    key: `key_lengths` L_key of the padded layout, `key_rows` (ΣL_key,) the positions of its real
    tokens in (B·L_key). Rows are None where nothing is padded."""

    batch: int
    dates: dict[str, int]
    counts: dict[str, list[int]]
    tokens: dict[str, int]  # G·T·L per sample of the padded layout
    tokens_per_date: dict[str, int]
    date_rows: dict[str, Tensor | None]
    token_rows: dict[str, Tensor | None]
    key_lengths: dict[str, int]
    key_rows: dict[str, Tensor | None]

    def pack(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The model's inputs as a packed batch of the real dates: `MOD (1, ΣT_i, ...)`, ...,
        `MOD_cu_dates (B+1,)`, `ref_date (B, 1, 3)`."""
        out = {"ref_date": batch["ref_date"]}
        device = batch["ref_date"].device
        for m, rows in self.date_rows.items():
            for name in (m + s for s in INPUTS):
                if name in batch:
                    out[name] = _rows(batch[name], rows)[None]
            cu = np.concatenate([[0], np.cumsum(self.counts[m])])
            out[f"{m}_cu_dates"] = torch.from_numpy(cu).to(device, torch.int32)
        return out

    def dates_back(self, m: str, x: Tensor, fill=0) -> Tensor:
        """(1, ΣT_i, ...) -> (B, T, ...), `fill` at padding dates."""
        t = self.dates[m]
        return _place(x[0], self.date_rows[m], self.batch * t, fill).view(self.batch, t, *x.shape[2:])

    def patches_back(self, m: str, x: Tensor) -> Tensor:
        """Patches (ΣT_i·L, P, C) -> (B·T·L, P, C), zeros at padding dates."""
        t = self.dates[m]
        per_date = x.view(-1, self.tokens_per_date[m], *x.shape[1:])  # (ΣT_i, L, P, C)
        return _place(per_date, self.date_rows[m], self.batch * t, 0).view(-1, *x.shape[1:])

    def tokens_back(self, m: str, x: Tensor) -> Tensor:
        """(1, Σ_i G·T_i·L, ...) sample after sample -> (B, G·T·L, ...), zeros at padding dates."""
        size = self.batch * self.tokens[m]
        return _place(x[0], self.token_rows[m], size, 0).view(self.batch, self.tokens[m], *x.shape[2:])

    def masks_in(self, mask: dict[str, Tensor]) -> dict[str, Tensor]:
        """Given masks {key: (B, L_key)} -> {key: (ΣL_key,)} of the real tokens."""
        if set(mask) != set(self.key_rows):
            raise ValueError(f"mask keys {sorted(mask)} must be the sequence keys {sorted(self.key_rows)}")
        out = {}
        for key, mk in mask.items():
            want = (self.batch, self.key_lengths[key])
            if tuple(mk.shape) != want:
                raise ValueError(f"mask['{key}'] has shape {tuple(mk.shape)}; expected {want}")
            rows = self.key_rows[key]
            out[key] = mk.flatten() if rows is None else mk.flatten().index_select(0, rows)
        return out

    def masks_back(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """{key: (ΣL_key,)} -> {key: (B, L_key)}, True (hidden) at padding tokens."""
        return {
            k: _place(v, self.key_rows[k], self.batch * self.key_lengths[k], True).view(self.batch, -1)
            for k, v in masks.items()
        }


def _sample_positions(groups: int, dates: int, tokens_per_date: int, held: int) -> np.ndarray:
    """Positions in one sample's (G·T·L) tokens of those of its first `held` dates, in order."""
    g, t = np.arange(groups)[:, None, None], np.arange(held)[None, :, None]
    return ((g * dates + t) * tokens_per_date + np.arange(tokens_per_date)).ravel()


# Inputs the model reads on the host (per-sample date counts of a padded batch, to build index
# arrays): a training step passes them as the loader made them, so no step waits on a device copy.
HOST_INPUT_SUFFIXES = ("_ndates",)


def padding_of(
    batch: dict[str, Tensor], specs: dict[str, ModalitySpec], members: dict[str, list[str]]
) -> Padding:
    """The padding of a padded batch, for sequence keys `members` (key -> modalities). `MOD_ndates`
    is read on the host (`HOST_INPUT_SUFFIXES`): free from the loader, one small copy if a caller
    put it on the device."""
    b = batch["ref_date"].shape[0]
    device = batch["ref_date"].device

    def dev(a: np.ndarray | None) -> Tensor | None:
        return None if a is None else torch.from_numpy(a).to(device)

    dates, counts, tokens, per_date, full, pos = {}, {}, {}, {}, {}, {}
    date_rows, token_rows = {}, {}
    for m, s in specs.items():
        t, g, n = batch[m].shape[1], len(s.groups), s.tokens_per_date
        nd = batch.get(f"{m}_ndates")
        c = [t] * b if nd is None else [int(v) for v in nd.tolist()]
        if len(c) != b or not all(0 <= v <= t for v in c):
            raise ValueError(
                f"{m}_ndates is {c}; expected {b} counts (one per sample) of real dates in 0..{t} "
                f"(the padded length of {m})"
            )
        dates[m], counts[m], tokens[m], per_date[m] = t, c, g * t * n, n
        full[m] = all(v == t for v in c)
        pos[m] = None if full[m] else [_sample_positions(g, t, n, v) for v in c]
        date_rows[m] = (
            None if full[m] else dev(np.concatenate([i * t + np.arange(v) for i, v in enumerate(c)]))
        )
        token_rows[m] = (
            None if full[m] else dev(np.concatenate([i * tokens[m] + p for i, p in enumerate(pos[m])]))
        )
    key_lengths, key_rows = {}, {}
    for key, ms in members.items():
        key_lengths[key] = length = sum(tokens[m] for m in ms)
        if all(full[m] for m in ms):
            key_rows[key] = None
            continue
        offsets = np.cumsum([0] + [tokens[m] for m in ms])
        every = {m: np.arange(tokens[m]) for m in ms}  # a sample holding all dates: every position
        parts = [
            i * length + offsets[j] + (every[m] if pos[m] is None else pos[m][i])
            for i in range(b)
            for j, m in enumerate(ms)
        ]
        key_rows[key] = dev(np.concatenate(parts))
    return Padding(b, dates, counts, tokens, per_date, date_rows, token_rows, key_lengths, key_rows)
