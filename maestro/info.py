"""`maestro info`: what a config costs per sample, before any work starts.

Tokens per modality and per fusion group (total, and visible to the encoder at the configured mask
ratio: `round(ratio · L)` tokens masked per sequence), then parameters per part and FLOPs per sample
when the model package is available.
"""

from __future__ import annotations

from typing import Any

from maestro.config import Config


def group_mask_ratio(cfg: Config, dates_times_groups: int) -> float:
    """Per-sequence mask ratio `1 − (1 − r) / n^scale` (n: dates × band groups in the sequence)."""
    r, s = cfg.mask.ratio, cfg.mask.scale
    return 1.0 - (1.0 - r) / (dates_times_groups**s)


def masked_count(ratio: float, length: int) -> int:
    """Tokens masked in a sequence of `length`: Python's `round` (banker's rounding), as the reference."""
    return round(ratio * length)


def sequences(cfg: Config) -> dict[str, list[str]]:
    """The encoder's sequences per sample: key -> modalities, by fusion mode.

    `group`: one sequence per fusion group; `mod`: one per modality; `shared`/`monotemp`: one per
    image (date and band group) of each modality, reported per modality.
    """
    mods = cfg.derived.modalities
    if cfg.model.fusion == "group":
        return dict(cfg.derived.groups)
    return {m: [m] for m in mods}


def tokens(cfg: Config) -> dict[str, Any]:
    """Token counts per modality and per sequence key (the JSON shape of DESIGN.md)."""
    mods = cfg.derived.modalities
    out_mods: dict[str, dict[str, int]] = {}
    out_groups: dict[str, dict[str, int]] = {}
    for key, members in sequences(cfg).items():
        total = sum(mods[m].tokens for m in members)
        if cfg.model.fusion in ("shared", "monotemp"):
            # Each image is its own sequence, masked at the plain ratio.
            visible = 0
            for m in members:
                per_image = mods[m].tokens_per_date
                images = mods[m].num_dates * len(mods[m].groups)
                visible += images * (per_image - masked_count(cfg.mask.ratio, per_image))
        else:
            n = sum(mods[m].num_dates * len(mods[m].groups) for m in members)
            visible = total - masked_count(group_mask_ratio(cfg, n), total)
        out_groups[key] = {"total": total, "visible": visible}
        for m in members:
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
    from maestro.model.flops import flops_per_sample, parameter_counts

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
