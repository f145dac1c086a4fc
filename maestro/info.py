"""`maestro info`: what a config costs per sample, before any work starts.

Tokens per modality and per fusion group (total, and visible to the encoder at the configured mask
ratio: `maestro.model.masking.masked_count` tokens masked per sequence, the model's own rule), then
parameters per part and FLOPs per sample.
"""

from __future__ import annotations

from typing import Any

from maestro.config import Config
from maestro.model.flops import flops_per_sample, parameter_counts
from maestro.model.fusion import PER_IMAGE, sequence_tokens
from maestro.model.mae import mask_rule, sequence_members


def sequences(cfg: Config) -> dict[str, list[str]]:
    """The encoder's sequence keys per sample: key -> modalities, by fusion mode (`shared` and
    `monotemp` have one sequence per image of each modality, reported per modality)."""
    return sequence_members(cfg)


def tokens(cfg: Config) -> dict[str, Any]:
    """Token counts per modality and per sequence key (the JSON shape of DESIGN.md)."""
    mods = cfg.derived.modalities
    members = sequences(cfg)
    per_key = sequence_tokens(mods, members, cfg.model.fusion in PER_IMAGE, mask_rule(cfg))
    out_mods: dict[str, dict[str, int]] = {}
    out_groups: dict[str, dict[str, int]] = {}
    for key, ms in members.items():
        seq = per_key[key]
        total, visible = seq.sequences * seq.length, seq.sequences * seq.visible
        out_groups[key] = {"total": total, "visible": visible}
        for m in ms:
            # Inside a shared sequence the split between modalities is random; report the expectation.
            out_mods[m] = {"total": mods[m].tokens, "visible": round(mods[m].tokens * visible / total)}
    return {
        "total": sum(g["total"] for g in out_groups.values()),
        "visible": sum(g["visible"] for g in out_groups.values()),
        "modalities": out_mods,
        "groups": out_groups,
    }


def report(cfg: Config) -> dict[str, Any]:
    """The full `maestro info` report: tokens, and parameters and FLOPs from the model."""
    out: dict[str, Any] = {
        "dataset": cfg.data.dataset,
        "size": cfg.model.size,
        "fusion": cfg.model.fusion,
        "tokens": tokens(cfg),
    }
    out["parameters"] = parameter_counts(cfg)
    out["flops_per_sample"] = flops_per_sample(cfg)
    return out


def format_report(rep: dict[str, Any]) -> str:
    """Human-readable table of a report."""
    lines = [f"dataset {rep['dataset']}  size {rep['size']}  fusion {rep['fusion']}", ""]
    t = rep["tokens"]
    lines.append(f"{'modality':<12}{'tokens':>8}{'visible':>9}")
    for m, v in t["modalities"].items():
        lines.append(f"{m:<12}{v['total']:>8}{v['visible']:>9}")
    lines.append(f"{'sequence':<12}{'tokens':>8}{'visible':>9}")
    for g, v in t["groups"].items():
        lines.append(f"{g:<12}{v['total']:>8}{v['visible']:>9}")
    lines.append(f"{'total':<12}{t['total']:>8}{t['visible']:>9}")
    if "parameters" in rep:
        lines += ["", "parameters"]
        lines += [f"  {k:<18}{v:>14,}" for k, v in rep["parameters"].items()]
    if "flops_per_sample" in rep:
        lines += ["", "FLOPs per sample (forward)"]
        lines += [f"  {k:<18}{v:>14.3e}" for k, v in rep["flops_per_sample"].items()]
    return "\n".join(lines)
