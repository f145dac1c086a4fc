"""`maestro shards inspect`: what a split holds, from its manifest and a read of its samples.

Reports the manifest summary, and per modality: stored shapes, dtype, date range, dates per
sample, the valid fraction and the per-band statistics recorded while writing.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np

from maestro import storage
from shards import manifest as manifest_io
from shards.reader import iter_shard


def _iso(year: int, doy: int) -> str:
    return (dt.date(int(year), 1, 1) + dt.timedelta(days=int(doy) - 1)).isoformat()


def inspect(split_url: str, max_samples: int | None = None) -> dict[str, Any]:
    """Summary of a split; reads at most `max_samples` samples (all by default)."""
    m = manifest_io.read(split_url)
    per_mod: dict[str, dict[str, Any]] = {}
    read = 0
    for shard in m["shards"]:
        if max_samples is not None and read >= max_samples:
            break
        for s in iter_shard(storage.join(split_url, shard["name"])):
            if max_samples is not None and read >= max_samples:
                break
            read += 1
            for mod, x in s.arrays.items():
                acc = per_mod.setdefault(
                    mod, {"shapes": set(), "dtypes": set(), "dates": [], "lo": None, "hi": None, "valid": []}
                )
                acc["shapes"].add(tuple(x.shape[1:]))
                acc["dtypes"].add(str(x.dtype))
                d = s.dates[mod].astype(np.int64)
                acc["dates"].append(len(d))
                order = d[:, 0] * 1000 + d[:, 1]
                lo, hi = d[order.argmin()], d[order.argmax()]
                if acc["lo"] is None or tuple(lo) < tuple(acc["lo"]):
                    acc["lo"] = lo
                if acc["hi"] is None or tuple(hi) > tuple(acc["hi"]):
                    acc["hi"] = hi
                if mod in s.valid:
                    acc["valid"].append(float(s.valid[mod].mean()))
    modalities = {}
    for mod, acc in per_mod.items():
        n = np.array(acc["dates"])
        modalities[mod] = {
            "shapes": [["T", *shape] for shape in sorted(acc["shapes"])],
            "dtypes": sorted(acc["dtypes"]),
            "dates": {
                "first": _iso(*acc["lo"][:2]),
                "last": _iso(*acc["hi"][:2]),
                "per_sample": {"min": int(n.min()), "mean": float(n.mean()), "max": int(n.max())},
            },
            "valid_fraction": float(np.mean(acc["valid"])) if acc["valid"] else None,
            "bands": m["statistics"]["modalities"].get(mod, {}),
        }
    return {
        "url": split_url,
        "dataset": m["dataset"],
        "split": m["split"],
        "source": m.get("source", ""),
        "samples": manifest_io.total_samples(m),
        "shards": len(m["shards"]),
        "bytes": sum(s["bytes"] for s in m["shards"]),
        "skipped": len(m["skipped"]),
        "samples_read": read,
        "targets": sorted(m.get("targets", {})),
        "modalities": modalities,
        "statistics_provenance": m["statistics"]["provenance"],
    }


def format_report(r: dict[str, Any]) -> str:
    """Human-readable lines of an inspect report."""
    lines = [
        f"{r['url']}: {r['dataset']}/{r['split']}, {r['samples']} samples in {r['shards']} shards, "
        f"{r['bytes'] / 2**20:.1f} MB, {r['skipped']} skipped; targets {', '.join(r['targets']) or '-'}",
        f"source: {r['source']}",
    ]
    for mod, info in r["modalities"].items():
        d = info["dates"]
        valid = "-" if info["valid_fraction"] is None else f"{info['valid_fraction']:.3f}"
        shapes = " | ".join("(" + ", ".join(map(str, s)) + ")" for s in info["shapes"])
        lines.append(
            f"  {mod}: {shapes} {'/'.join(info['dtypes'])}, dates {d['first']} .. {d['last']} "
            f"({d['per_sample']['min']}-{d['per_sample']['max']} per sample), valid {valid}"
        )
        for band, st in info["bands"].items():
            if st.get("count"):
                pct = st["percentiles"]
                lines.append(
                    f"    {band:>8}: mean {st['mean']:.4g} std {st['std']:.4g} "
                    f"p2 {pct['p2']:.4g} p50 {pct['p50']:.4g} p98 {pct['p98']:.4g}"
                )
    return "\n".join(lines)
