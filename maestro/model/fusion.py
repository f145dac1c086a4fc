"""Sequence keys of a fusion mode, and their token counts at the configured dates.

The keys of the encoder's sequences (and of the masks) by `model.fusion`: `group` one per fusion
group (groups come from the registry, so YAML can regroup modalities); `mod`, `monotemp`, `shared`
one per modality. In `monotemp` and `shared` each image (band group and date) of a modality is its
own sequence (`PER_IMAGE`). `maestro info`, the FLOPs count and the model all read them here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from maestro.modalities import ModalitySpec
from maestro.model.masking import MaskRule, masked_count

FUSIONS = ("shared", "monotemp", "mod", "group")
PER_IMAGE = ("shared", "monotemp")


def sequence_keys(
    fusion: str, specs: Mapping[str, ModalitySpec], groups: Mapping[str, list[str]]
) -> dict[str, list[str]]:
    """key -> its modalities, in input order."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion {fusion!r} must be one of {FUSIONS}")
    if fusion == "group":
        return {k: list(v) for k, v in groups.items()}
    return {m: [m] for m in specs}


@dataclass(frozen=True)
class SequenceTokens:
    """One key's sequences per sample, at each modality's `num_dates`: how many, their length and
    the tokens each keeps visible."""

    sequences: int
    length: int
    visible: int


def sequence_tokens(
    specs: Mapping[str, ModalitySpec], members: Mapping[str, list[str]], per_image: bool, rule: MaskRule
) -> dict[str, SequenceTokens]:
    """Per key: the sequences of one sample and their visible tokens under `rule`."""
    out = {}
    for key, ms in members.items():
        if per_image:
            (m,) = ms
            s = specs[m]
            n = s.tokens_per_date
            out[key] = SequenceTokens(s.num_dates * len(s.groups), n, n - masked_count(rule.ratio, n))
            continue
        length = sum(specs[m].tokens for m in ms)
        images = sum(specs[m].num_dates * len(specs[m].groups) for m in ms)
        out[key] = SequenceTokens(1, length, length - masked_count(rule.ratio, length, images, rule.scale))
    return out
