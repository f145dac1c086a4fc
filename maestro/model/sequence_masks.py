"""The masks of a model's sequence keys (maestro_reference.md §2.1): random draws for padded and
packed batches, and the check of masks given by the caller.

The primitives (structural proposals, exact-ratio sampling, visible-token lists) are in
`maestro.model.masking`; this module applies them per sequence key of a fusion mode, with each
modality's structural probabilities (`Structure`) derived once from the config.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from maestro.config import Config
from maestro.info import group_mask_ratio, masked_count
from maestro.modalities import ModalitySpec
from maestro.model.attention import Packing
from maestro.model.masking import Structure, exact_mask, propose
from maestro.model.packed import PackedLayout


class SequenceMasks:
    """Masks {key: (B, L_key)} of the sequence keys `members` (key -> modalities, in order).
    `per_image`: one sequence per image (band group and date) of each modality."""

    def __init__(
        self, cfg: Config, specs: dict[str, ModalitySpec], members: dict[str, list[str]], per_image: bool
    ):
        self.cfg, self.specs, self.members, self.per_image = cfg, specs, members, per_image
        self.structure = self._structures(cfg)

    def _structures(self, cfg: Config) -> dict[str, Structure]:
        """Structural mask probabilities per modality (§2.1); dates apply only when T > 1."""
        mk = cfg.mask
        out = {}
        for members in self.members.values():
            for m in members:
                if self.per_image:
                    out[m] = Structure()
                    continue
                shares = cfg.model.fusion == "group" and len(members) > 1
                out[m] = Structure(
                    modality=mk.modality if shares else None,
                    bands=mk.bands if len(self.specs[m].groups) > 1 else None,
                    dates=mk.dates,
                    locations=mk.locations,
                )
        return out

    def seq_len(self, key: str, tokens: int) -> int:
        """Length of one sequence of `key` whose sample holds `tokens` tokens."""
        return self.specs[key].tokens_per_date if self.per_image else tokens

    def draw(
        self, shapes: dict[str, tuple[int, int, int]], batch: int, generator: torch.Generator | None, device
    ) -> tuple[dict[str, Tensor], dict[str, int]]:
        """Random masks {key: (B, L_key)} and the visible count per sequence of each key.
        `shapes` gives (G, T, L) per modality as found in the batch."""
        masks, visible = {}, {}
        for key, members in self.members.items():
            length = sum(g * t * n for g, t, n in (shapes[m] for m in members))
            if self.per_image:
                g, t, n = shapes[key]
                k = min(masked_count(self.cfg.mask.ratio, n), n - 1)
                masks[key] = exact_mask(batch * g * t, n, k, None, generator, device).view(batch, length)
                visible[key] = n - k
                continue
            n = sum(shapes[m][0] * shapes[m][1] for m in members)
            k = min(masked_count(group_mask_ratio(self.cfg, n), length), length - 1)
            plan = []
            for m in members:
                g, t, n = shapes[m]
                st = self.structure[m]
                plan.append((g, t, n, st if t > 1 else dataclasses.replace(st, dates=None)))
            prop = propose(plan, batch, generator, device)
            masks[key] = exact_mask(batch, length, k, prop, generator, device)
            visible[key] = length - k
        return masks, visible

    def check(self, mask: dict[str, Tensor], lengths: dict[str, int], batch: int) -> dict[str, Tensor]:
        if set(mask) != set(self.members):
            raise ValueError(f"mask keys {sorted(mask)} must be the sequence keys {sorted(self.members)}")
        out = {}
        for key, mk in mask.items():
            if tuple(mk.shape) != (batch, lengths[key]):
                raise ValueError(
                    f"mask['{key}'] has shape {tuple(mk.shape)}; expected {(batch, lengths[key])}"
                )
            out[key] = mk.bool()
            per_seq = out[key].view(-1, self.seq_len(key, lengths[key]))
            if bool(per_seq.all(1).any()):
                raise ValueError(f"mask['{key}'] masks a whole sequence; keep at least one token visible")
        return out

    def draw_packed(
        self, lay: PackedLayout, generator: torch.Generator | None, device
    ) -> tuple[dict[str, Tensor], dict[str, Packing]]:
        """Random masks of a packed batch {key: (ΣL_key,)} with exactly `round(ratio·L)` masked tokens
        per sequence (each sample's own ratio and length, never all of them), drawn on a layout
        padded to the longest series; and the packing of the visible tokens."""
        masks, visible = {}, {}
        for key, members in self.members.items():
            if self.per_image:
                n = self.specs[key].tokens_per_date
                k = min(masked_count(self.cfg.mask.ratio, n), n - 1)
                images = sum(lay.images[key])
                masks[key] = exact_mask(images, n, k, None, generator, device).flatten()
                visible[key] = Packing.dense(images, n - k, device)
                continue
            counts = [
                max(0, min(masked_count(group_mask_ratio(self.cfg, i), n), n - 1))
                for i, n in zip(lay.images[key], lay.lengths[key])
            ]
            b = len(counts)
            plan, ndates, held = [], [], []
            for m in members:
                s = self.specs[m]
                g, t, n = len(s.groups), max(lay.dates[m], default=0), s.tokens_per_date
                nd = torch.tensor(lay.dates[m], device=device)
                plan.append((g, t, n, self.structure[m]))
                ndates.append(nd)
                has = torch.arange(t, device=device) < nd[:, None]  # (B, T) dates the sample holds
                held.append(has[:, None, :, None].expand(b, g, t, n).flatten(1))
            held = torch.cat(held, 1)
            prop = propose(plan, b, generator, device, ndates, held)
            k = torch.tensor(counts, device=device)
            masks[key] = exact_mask(b, held.shape[1], k, prop, generator, device, held)[held]
            visible[key] = Packing.from_list([n - k for n, k in zip(lay.lengths[key], counts)], device)
        return masks, visible
