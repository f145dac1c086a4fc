"""Write your own sensor's data to a shard split, with the converters' validation, statistics and manifest.

Any modality of the registry works: a preset's, or one declared under a YAML config's
`data.modalities` (the config's `data.inputs` say which modalities every sample must hold). A
sample is a plain mapping:

    {"id": "tile_0001",                        # unique; becomes the tar key (dots -> '_')
     "arrays": {"planet": x},                  # (T, C, H, W) raw values, C = the raw channels
     "dates": {"planet": d},                   # (T, 3) integer rows (year, day_of_year 1-366, hour 0-23)
     "valid": {"planet": v},                   # optional (T, H, W), 1 = usable pixel (0: cloud, nodata)
     "labels": {"crop_type": y},               # optional labels (class raster or label vector)
     "meta": {"crs": "EPSG:32631", "bounds": [xmin, ymin, xmax, ymax]}}   # optional, JSON values

    from shards.own import write_samples
    manifest = write_samples("shards/planet", "train", "configs/planet.yaml", samples)

writes `shards/planet/train/` (tar shards, then `manifest.json`); point `data.shards` at it.
Arrays are stored in the modality's `dtype` (a safe cast is applied; an unsafe one is refused),
and bad samples stop the split with a message naming the sample and the array, or, with
`skip_bad=True`, are skipped and listed in the manifest.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maestro import storage
from maestro.config import Config, load
from maestro.errors import DataError
from maestro.modalities import ModalitySpec, TargetSpec, validate_modality
from shards.schema import Sample, sample_key
from shards.synth import raw_channels
from shards.writer import DEFAULT_SHARD_BYTES, ShardWriter, write_split

FIELDS = ("id", "arrays", "dates", "valid", "labels", "meta")
YEARS = (1900, 2200)


def specs_of(
    config: Config | str | Path | Mapping[str, ModalitySpec],
) -> tuple[str, dict[str, ModalitySpec], dict[str, TargetSpec]]:
    """(dataset name, modalities every sample holds, targets) of a config, a YAML path or a spec dict."""
    if isinstance(config, str | Path):
        config = load(config)
    if isinstance(config, Config):
        return config.data.dataset, dict(config.derived.modalities), dict(config.derived.targets)
    specs = {n: validate_modality(n, s, f"modality '{n}'") for n, s in config.items()}
    return "own", specs, {}


def _array(value: Any, where: str) -> np.ndarray:
    x = np.asarray(value)
    if x.dtype.hasobject:
        raise DataError(f"{where}: an object array; expected numbers")
    return x


def _series(mod: str, x: np.ndarray, spec: ModalitySpec, where: str) -> np.ndarray:
    need = raw_channels(spec)
    if x.ndim != 4 or 0 in x.shape:
        raise DataError(f"{where}: shape {x.shape}; expected (T, C, H, W) with T >= 1 dates and C = {need}")
    if x.shape[1] != need and (spec.source_channels is None or x.shape[1] < need):
        raise DataError(
            f"{where}: {x.shape[1]} channels; modality '{mod}' has {need} raw channels ({spec.bands})"
        )
    if x.dtype != np.dtype(spec.dtype):
        if not np.can_cast(x.dtype, spec.dtype, "safe"):
            raise DataError(
                f"{where}: dtype {x.dtype} does not fit the modality's dtype {spec.dtype}; set "
                f"data.modalities.{mod}.dtype: {x.dtype} or cast the array yourself"
            )
        x = x.astype(spec.dtype)
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).any():
        raise DataError(f"{where}: every value is NaN or infinite")
    return x


def _dates(d: np.ndarray, t: int, where: str) -> np.ndarray:
    if d.shape != (t, 3):
        raise DataError(f"{where}: shape {d.shape}; expected ({t}, 3) rows (year, day_of_year, hour)")
    if not np.issubdtype(d.dtype, np.integer):
        raise DataError(f"{where}: dtype {d.dtype}; expected integers (year, day_of_year, hour)")
    for col, name, (lo, hi) in ((0, "year", YEARS), (1, "day_of_year", (1, 366)), (2, "hour", (0, 23))):
        bad = (d[:, col] < lo) | (d[:, col] > hi)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}: row {i} {d[i].tolist()} has {name} {d[i, col]}; expected {lo}-{hi}")
    return d.astype(np.int16)


def _valid(v: np.ndarray, x: np.ndarray, where: str) -> np.ndarray:
    want = (x.shape[0], *x.shape[2:])
    if v.shape != want:
        raise DataError(f"{where}: shape {v.shape}; expected {want} (T, H, W)")
    if not np.isin(v, (0, 1)).all():
        raise DataError(f"{where}: values {np.unique(v)[:5].tolist()}...; expected 0 (unusable) or 1")
    return v.astype(np.uint8)


def to_sample(
    raw: Mapping[str, Any], specs: Mapping[str, ModalitySpec], split: str, where: str = ""
) -> Sample:
    """A validated Sample from a sample mapping (see the module doc); DataError names what is wrong."""
    if not isinstance(raw, Mapping):
        raise DataError(f"{where}a sample is {type(raw).__name__}; expected a mapping with keys {FIELDS}")
    sid = raw.get("id")
    if not isinstance(sid, str) or not sid:
        raise DataError(f"{where}sample id {sid!r}: expected a non-empty string under 'id'")
    at = f"{where}sample '{sid}'"
    unknown = set(raw) - set(FIELDS)
    if unknown:
        raise DataError(f"{at}: unknown keys {sorted(unknown)}; a sample has {FIELDS}")
    arrays_in, dates_in = dict(raw.get("arrays") or {}), dict(raw.get("dates") or {})
    extra = set(arrays_in) - set(specs)
    if extra:
        raise DataError(
            f"{at}: modalities {sorted(extra)} are not in the config's {sorted(specs)}; declare them "
            f"under data.modalities and list them in data.inputs"
        )
    missing = [m for m in specs if m not in arrays_in]
    if missing:
        raise DataError(f"{at}: modalities {missing} missing; every sample holds {sorted(specs)}")
    arrays, when, valid = {}, {}, {}
    for mod, spec in specs.items():
        arrays[mod] = _series(mod, _array(arrays_in[mod], f"{at} '{mod}'"), spec, f"{at} '{mod}'")
        if mod not in dates_in:
            raise DataError(f"{at}: no dates for '{mod}'; expected (T, 3) rows under dates['{mod}']")
        when[mod] = _dates(_array(dates_in[mod], ""), arrays[mod].shape[0], f"{at} dates['{mod}']")
    for mod, v in dict(raw.get("valid") or {}).items():
        if mod not in arrays:
            raise DataError(f"{at}: valid mask for '{mod}', which has no array")
        valid[mod] = _valid(_array(v, ""), arrays[mod], f"{at} valid['{mod}']")
    labels = {}
    for name, y in dict(raw.get("labels") or {}).items():
        if name in arrays or not name or "." in name:
            raise DataError(f"{at}: label name {name!r} must be new, non-empty and without '.'")
        labels[name] = _array(y, f"{at} labels['{name}']")
    meta = dict(raw.get("meta") or {})
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise DataError(f"{at}: 'meta' must hold JSON values ({e})") from e
    meta.update(id=sid, split=split)
    return Sample(sample_key(sid), arrays, when, valid, labels, meta)


def write_samples(
    out_url: str,
    split: str,
    config: Config | str | Path | Mapping[str, ModalitySpec],
    samples: Iterable[Mapping[str, Any]],
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    shard_samples: int | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    progress: bool = False,
    source: str = "written with shards.own.write_samples",
) -> dict[str, Any]:
    """Write `samples` (an iterable of sample mappings, read one at a time) to `out_url/split`.

    `config` is a Config, a YAML path or `{name: ModalitySpec}`; returns the split's manifest.
    """
    dataset, specs, targets = specs_of(config)
    writer = ShardWriter(
        storage.join(out_url, split),
        dataset=dataset,
        split=split,
        modalities=specs,
        targets=targets,
        source=source,
        shard_bytes=shard_bytes,
        shard_samples=shard_samples,
        overwrite=overwrite,
    )
    read = functools.partial(_read, specs=specs, split=split)
    numbered = (_Numbered(i, raw) for i, raw in enumerate(samples))
    return write_split(writer, read, numbered, skip_bad=skip_bad, progress=progress)


@dataclass(frozen=True)
class _Numbered:
    """The `index`-th sample mapping given to `write_samples`; `sample_id` names it if it is bad."""

    index: int
    raw: Any

    @property
    def sample_id(self) -> str:
        sid = self.raw.get("id") if isinstance(self.raw, Mapping) else None
        return str(sid or f"sample {self.index}")


def _read(item: _Numbered, specs: dict[str, ModalitySpec], split: str) -> Sample:
    return to_sample(item.raw, specs, split, f"sample {item.index}: ")
