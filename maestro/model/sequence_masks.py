"""The masks of a model's sequence keys (maestro_reference.md §2.1): random draws on a batch's
layout, and the check of masks given by the caller.

The primitives (structural proposals, exact-ratio sampling, the mask count) are in
`maestro.model.masking`; this module applies them per sequence key of a fusion mode, with each
modality's structural probabilities (`Structure`) derived once from the model's `MaskRule`.
Masks are flat `{key: (ΣL_key,)}`, each key's sequences concatenated sample after sample
(`maestro.model.packed`): every sequence holds only its sample's real tokens.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from maestro.modalities import ModalitySpec
from maestro.model.attention import Packing
from maestro.model.masking import MaskRule, Structure, exact_mask, masked_count, propose
from maestro.model.packed import PackedLayout


class SequenceMasks:
    """Masks of the sequence keys `members` (key -> modalities, in order) under `rule`.
    `per_image`: one sequence per image (band group and date) of each modality."""

    def __init__(
        self, specs: dict[str, ModalitySpec], members: dict[str, list[str]], per_image: bool, rule: MaskRule
    ):
        self.specs, self.members, self.per_image, self.rule = specs, members, per_image, rule
        self.structure = self._structures()

    def _structures(self) -> dict[str, Structure]:
        """Structural mask probabilities per modality (§2.1): a whole modality only inside a key of
        several, band groups only where there are several; dates only where a sample has several
        (decided per draw)."""
        st = self.rule.structure
        out = {}
        for members in self.members.values():
            for m in members:
                if self.per_image:
                    out[m] = Structure()
                    continue
                out[m] = dataclasses.replace(
                    st,
                    modality=st.modality if len(members) > 1 else None,
                    bands=st.bands if len(self.specs[m].groups) > 1 else None,
                )
        return out

    def draw(
        self, lay: PackedLayout, generator: torch.Generator | None, device
    ) -> tuple[dict[str, Tensor], dict[str, Packing]]:
        """Random masks {key: (ΣL_key,)} with exactly `masked_count` masked tokens per sequence (each
        sample's own length and images), and the packing of the visible tokens. Drawn on a layout
        padded to the longest series; when every sample holds the same dates no position is padding
        and the draw takes the top-k path."""
        masks, visible = {}, {}
        for key, members in self.members.items():
            if self.per_image:
                n = self.specs[key].tokens_per_date
                k = masked_count(self.rule.ratio, n)
                images = sum(lay.images[key])
                masks[key] = exact_mask(images, n, k, None, generator, device).flatten()
                visible[key] = Packing.dense(images, n - k, device)
                continue
            counts = [
                masked_count(self.rule.ratio, n, i, self.rule.scale)
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
            if all(len(set(lay.dates[m])) <= 1 for m in members):  # nothing padded: one k for all
                masks[key] = exact_mask(b, held.shape[1], counts[0] if b else 0, prop, generator, device)
                masks[key] = masks[key].flatten()
            else:
                k = torch.tensor(counts, device=device)
                masks[key] = exact_mask(b, held.shape[1], k, prop, generator, device, held)[held]
            visible[key] = Packing.from_list([n - k for n, k in zip(lay.lengths[key], counts)], device)
        return masks, visible

    @staticmethod
    def check(mask: dict[str, Tensor], lay: PackedLayout) -> tuple[dict[str, Tensor], dict[str, Packing]]:
        """A given mask {key: (ΣL_key,)} checked (keys, shapes, no fully masked sequence), and the
        packing of its visible tokens (one host sync)."""
        if set(mask) != set(lay.lengths):
            raise ValueError(f"mask keys {sorted(mask)} must be the sequence keys {sorted(lay.lengths)}")
        masks, visible = {}, {}
        for key, mk in mask.items():
            total, cu = sum(lay.lengths[key]), lay.packing[key].cu_seqlens.long()
            if tuple(mk.shape) != (total,):
                raise ValueError(
                    f"mask['{key}'] has shape {tuple(mk.shape)}; a packed batch takes ({total},) "
                    f"(its sequences concatenated)"
                )
            masks[key] = mk.bool()
            counts = F.pad((~masks[key]).cumsum(0), (1, 0)).index_select(0, cu).diff()
            if bool(((counts == 0) & (cu.diff() > 0)).any()):
                raise ValueError(f"mask['{key}'] masks a whole sequence; keep at least one token visible")
            visible[key] = Packing.from_lengths(counts)
        return masks, visible
