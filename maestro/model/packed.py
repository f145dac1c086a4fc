"""Packed batches (`data.token_budget`): samples with their own date counts, concatenated, no padding.

A packed batch (`maestro.data.collate.collate_packed`) holds per modality `MOD (1, ΣT, C, H, W)`,
`MOD_dates (1, ΣT, 3)`, optionally `MOD_valid (1, ΣT, H, W)`, and `MOD_cu_dates (n+1,)` the
cumulative date counts of its n samples; `ref_date (n, 1, 3)` per sample. The model embeds it as a
batch of one, which gives each modality's tokens in *native* order `(G, ΣT, L)`: band group outer
across all samples. `PackedLayout` maps them to the *packed* order of each sequence key — sample
after sample, each sample's tokens as in a padded batch (its key's modalities in input order, then
band group, date, row-major position) — and back. A key's sequences are its samples (`group`,
`mod`) or each image of them (`monotemp`, `shared`).

The index maps are built on the host from the date counts (for a packed batch `MOD_cu_dates`, one
small device-to-host read per batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from maestro.modalities import ModalitySpec
from maestro.model.attention import Packing


def is_packed(batch: dict) -> bool:
    """A packed batch carries `MOD_cu_dates`."""
    return any(k.endswith("_cu_dates") for k in batch)


@dataclass(frozen=True)
class PackedLayout:
    """Index maps of one packed batch. Per modality: `dates` per sample, `inverse` (N_m,) the packed
    position (in its key) of each native token, `rows` (N_m,) the packed positions of its tokens
    sample after sample. Per key: `order` (ΣL_key,) the native position of each packed token, in the
    key's modalities' native tokens concatenated; `group_ids` (ΣL_key,) the band group of each
    (counted over the key's modalities, the order of the mask-token table); `lengths` and `images`
    (dates × band groups) per sample; `packing` its sequences."""

    dates: dict[str, list[int]]
    inverse: dict[str, Tensor]
    rows: dict[str, Tensor]
    order: dict[str, Tensor]
    group_ids: dict[str, Tensor]
    lengths: dict[str, list[int]]
    images: dict[str, list[int]]
    packing: dict[str, Packing]

    def to_packed(self, native: dict[str, Tensor], members: dict[str, list[str]]) -> dict[str, Tensor]:
        """{MOD: (1, N_m, ...)} native -> {key: (ΣL_key, ...)} packed."""
        return {
            k: torch.cat([native[m][0] for m in ms]).index_select(0, self.order[k])
            for k, ms in members.items()
        }

    def to_native(self, packed: dict[str, Tensor], members: dict[str, list[str]]) -> dict[str, Tensor]:
        """{key: (ΣL_key, ...)} packed -> {MOD: (1, N_m, ...)} native."""
        return {m: packed[k].index_select(0, self.inverse[m])[None] for k, ms in members.items() for m in ms}

    def per_sample(self, packed: dict[str, Tensor], members: dict[str, list[str]]) -> dict[str, Tensor]:
        """{key: (ΣL_key, ...)} -> {MOD: (1, Σ_i G·T_i·L, ...)}, each sample's tokens contiguous."""
        return {m: packed[k].index_select(0, self.rows[m])[None] for k, ms in members.items() for m in ms}


def _cu(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def _native_positions(groups: int, tokens_per_date: int, dates: list[int]) -> list[np.ndarray]:
    """Per sample, the native positions `(G, ΣT, L)` of its tokens in packed order (band group, its
    dates, position)."""
    total, cu = sum(dates), _cu(dates)
    g, pos = np.arange(groups)[:, None, None], np.arange(tokens_per_date)
    return [
        ((g * total + cu[i] + np.arange(t)[None, :, None]) * tokens_per_date + pos).ravel()
        for i, t in enumerate(dates)
    ]


def packed_dates(batch: dict, specs: dict[str, ModalitySpec]) -> dict[str, list[int]]:
    """The dates per sample of each modality of a packed batch (one small device-to-host read)."""
    dates = {m: batch[f"{m}_cu_dates"].diff().tolist() for m in specs}
    n = len(batch["ref_date"])
    for m, d in dates.items():
        if len(d) != n:
            raise ValueError(f"{m}_cu_dates describes {len(d)} samples but ref_date has {n}")
    return dates


def build_layout(
    dates: dict[str, list[int]],
    specs: dict[str, ModalitySpec],
    members: dict[str, list[str]],
    per_image: bool,
    device: torch.device,
) -> PackedLayout:
    """The layout of a packed batch whose samples hold `dates` (per modality, per sample) for
    sequence keys `members` (key -> modalities)."""
    n = len(next(iter(dates.values())))

    def dev(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a).to(device)

    inverse, rows, order, group_ids, lengths, images, packing = {}, {}, {}, {}, {}, {}, {}
    for key, ms in members.items():
        # Per member j and sample i: native positions (in the members' concatenation) and mask-token ids.
        pos, ids, offset, g_offset = [], [], 0, 0
        for m in ms:
            g, n_tok = len(specs[m].groups), specs[m].tokens_per_date
            pos.append([offset + p for p in _native_positions(g, n_tok, dates[m])])
            ids.append([np.repeat(g_offset + np.arange(g), t * n_tok) for t in dates[m]])
            offset, g_offset = offset + g * sum(dates[m]) * n_tok, g_offset + g
        sample_major = [(i, j) for i in range(n) for j in range(len(ms))]
        pos_all = np.concatenate([pos[j][i] for i, j in sample_major] or [np.zeros(0, np.int64)])
        owner = np.concatenate([np.full(pos[j][i].size, j) for i, j in sample_major] or [np.zeros(0)])
        order[key] = dev(pos_all)
        group_ids[key] = dev(np.concatenate([ids[j][i] for i, j in sample_major] or [np.zeros(0, np.int64)]))
        inv = np.argsort(pos_all, kind="stable")  # packed position of each native token, in native order
        sizes = [sum(p.size for p in pos[j]) for j in range(len(ms))]
        for j, (m, part) in enumerate(zip(ms, np.split(inv, np.cumsum(sizes)[:-1]))):
            inverse[m], rows[m] = dev(part), dev(np.flatnonzero(owner == j))
        lengths[key] = [sum(pos[j][i].size for j in range(len(ms))) for i in range(n)]
        images[key] = [sum(len(specs[m].groups) * dates[m][i] for m in ms) for i in range(n)]
        if per_image:
            (m,) = ms
            packing[key] = Packing.dense(sum(images[key]), specs[m].tokens_per_date, device)
        else:
            packing[key] = Packing.from_list(lengths[key], device)
    return PackedLayout(dates, inverse, rows, order, group_ids, lengths, images, packing)
