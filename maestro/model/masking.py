"""Token masking: structural proposals, exact-ratio sampling, and the visible-token index lists.

Per sequence key (a fusion group, a modality, or each image in `shared`/`monotemp`), exactly
`masked_count` tokens are masked in every sequence (maestro_reference.md §2): the one rule that the
model's draws, `maestro info` and the FLOPs count all use. Structural masks
(whole modality, band group, date, location) are proposed first; proposed tokens then rank before
all others, *randomly among themselves* (the reference's argsort tie order is not relied upon), and
random tokens complete the count. Everything is drawn on the model's device from an explicit
`torch.Generator`, vectorized over the batch; a sample whose whole sequence was proposed is redrawn
a bounded number of times without leaving the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from maestro.model.attention import Packing

REDRAWS = 4  # extra structural draws for samples whose proposal covers their whole sequence


@dataclass(frozen=True)
class Structure:
    """Probabilities of the structural masks of one modality (None: off)."""

    modality: float | None = None
    bands: float | None = None
    dates: float | None = None
    locations: float | None = None


@dataclass(frozen=True)
class MaskRule:
    """The masking of a model (`mask.*`): the ratio, its scaling with the images of a sequence,
    and the structural probabilities (applied where a sequence has the structure)."""

    ratio: float = 0.75
    scale: float = 0.0
    structure: Structure = Structure()


def masked_count(ratio: float, length: int, images: int = 1, scale: float = 0.0) -> int:
    """Tokens masked in a sequence of `length` tokens made of `images` images (dates × band groups):
    `round(r·L)` (Python's banker's rounding, as the reference) at the sequence's ratio
    `r = 1 − (1 − ratio) / images^scale` (the plain ratio when `scale` is 0), keeping at least one
    token visible; 0 for an empty sequence."""
    r = ratio if scale == 0 else 1.0 - (1.0 - ratio) / images**scale
    return max(0, min(round(r * length), length - 1))


def _propose_one(
    b: int,
    g: int,
    t: int,
    n: int,
    p: Structure,
    ndates: Tensor | None,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """(B, G·T·L) bool proposal for one modality, band group outer then date then position.
    `ndates` (B,): each sample's own date count (packed batches); date masks only where it is > 1."""
    prop = torch.zeros(b, g, t, n, dtype=torch.bool, device=device)
    shapes = (
        (p.modality, (b, 1, 1, 1), None),
        (p.bands, (b, g, 1, 1), None),
        (p.dates, (b, 1, t, 1), None if ndates is None else (ndates > 1).view(b, 1, 1, 1)),
        (p.locations, (b, 1, 1, n), None),
    )
    for prob, shape, allowed in shapes:
        if prob is not None:
            draw = torch.rand(shape, generator=generator, device=device) < prob
            prop = prop | (draw if allowed is None else draw & allowed)
    return prop.flatten(1)


def propose(
    members: list[tuple[int, int, int, Structure]],
    batch: int,
    generator: torch.Generator | None,
    device: torch.device,
    ndates: list[Tensor] | None = None,
    held: Tensor | None = None,
) -> Tensor:
    """Structural proposal (B, L_key) for a sequence made of `members` (G, T, L, Structure) in order.

    Packed batches give each member's date counts per sample `ndates` [(B,)] and the positions a
    sample holds `held` (B, L_key) of a layout padded to the longest series (T the longest).
    Samples whose proposal covers the whole sequence take a fresh draw, `REDRAWS` times at most;
    any left after that get no proposal (plain random masking)."""
    nd = ndates or [None] * len(members)

    def draw() -> Tensor:
        parts = [
            _propose_one(batch, g, t, n, p, d, generator, device) for (g, t, n, p), d in zip(members, nd)
        ]
        return torch.cat(parts, 1)

    def covered(prop: Tensor) -> Tensor:
        return (prop if held is None else prop | ~held).all(1, keepdim=True)

    prop = draw()
    for _ in range(REDRAWS):
        prop = torch.where(covered(prop), draw(), prop)
    return prop & ~covered(prop)


def exact_mask(
    num_seqs: int,
    length: int,
    k: int | Tensor,
    proposal: Tensor | None,
    generator: torch.Generator | None,
    device,
    held: Tensor | None = None,
) -> Tensor:
    """(S, L) bool with exactly `k` True per row (`k` (S,): a count per row): proposed tokens first,
    in random order among themselves, then random others; positions outside `held` (S, L) never."""
    score = torch.rand(num_seqs, length, generator=generator, device=device)
    if proposal is not None:
        score = score - proposal.float()  # proposed tokens in [-1, 0), others in [0, 1)
    if isinstance(k, int):
        idx = torch.topk(score, k, dim=1, largest=False, sorted=False).indices
        return torch.zeros(num_seqs, length, dtype=torch.bool, device=device).scatter(1, idx, True)
    if held is not None:
        score = score.masked_fill(~held, 2.0)  # positions a row does not hold rank last
    rank = score.argsort(1).argsort(1)
    return rank < k[:, None]


@dataclass(frozen=True)
class Selection:
    """Visible tokens of one sequence key: `rows` (K,) into its flat tokens, ascending; `packing` of those K rows per sequence; `source` (N,) the row of `rows` holding
    each position, −1 where masked (the un-masking map)."""

    rows: Tensor
    packing: Packing
    source: Tensor


def select_packed(mask: Tensor, visible: Packing) -> Selection:
    """Visible tokens of packed sequences: mask (N,) bool, True = masked; `visible` the packing of
    the visible tokens (its lengths per sequence, known beforehand). With their total known on the
    host (random draws) no host sync happens."""
    if visible.total is None:
        rows = torch.nonzero(~mask).squeeze(1)
    else:
        rows = torch.nonzero_static(~mask, size=visible.total).squeeze(1)
    return Selection(rows, visible, _source(rows, mask.numel()))


def _source(rows: Tensor, n: int) -> Tensor:
    """(n,) the index in `rows` of each position, −1 where not selected."""
    source = torch.full((n,), -1, dtype=torch.long, device=rows.device)
    return source.index_copy(0, rows, torch.arange(rows.numel(), device=rows.device))
