"""Shard format, version 1: the sample schema shared by the writer (`shards/`) and the loader (`maestro/data`).

One sample is a group of tar members sharing a key (DESIGN.md "Shard format, version 1"):

- `KEY.MOD.npy`        raw values `(T, C, H, W)` in the source dtype (T = 1 for single-date modalities)
- `KEY.MOD.dates.npy`  `(T, 3)` int16 rows `(year, day_of_year, hour)`
- `KEY.MOD.valid.npy`  optional `(T, H, W)` uint8, 0 where cloud or nodata
- `KEY.TARGET.npy`     labels (class-id raster or multi-label vector)
- `KEY.meta.json`      sample id, split, reference date, CRS and bounds, source and licence, and the
                       lists of modality and target names present (without the lists, as other
                       tools write it, a modality is a `MOD.npy` with `MOD.dates.npy`, a target
                       any other `NAME.npy`)

Only `.npy` (with `allow_pickle=False`) and `.json` are ever decoded; anything else is an error.
WebDataset splits a member name at the first dot of its basename, so keys never contain dots.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maestro.errors import DataError
from shards.tar import KEY_ALPHABET

FORMAT = "maestro-shards"
_KEY_BAD = re.compile(f"[^{KEY_ALPHABET}]")


def sample_key(sample_id: str) -> str:
    """A tar key for a sample id: dots and other separators become '_' (the id stays in meta.json)."""
    return _KEY_BAD.sub("_", sample_id)


@dataclass
class Sample:
    """One decoded sample: per-modality raw arrays, dates and valid masks, targets and metadata."""

    key: str
    arrays: dict[str, np.ndarray]
    dates: dict[str, np.ndarray]
    valid: dict[str, np.ndarray] = field(default_factory=dict)
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def check(self, where: str = "") -> None:
        """Raise DataError naming the sample and member if any array breaks the schema."""
        at = f"{where}sample '{self.key}'"
        if not self.arrays:
            raise DataError(f"{at}: no modality arrays")
        for mod, x in self.arrays.items():
            if x.ndim != 4:
                raise DataError(f"{at}: '{mod}.npy' has shape {x.shape}; expected (T, C, H, W)")
            d = self.dates.get(mod)
            if d is None:
                raise DataError(f"{at}: '{mod}.dates.npy' is missing")
            if d.shape != (x.shape[0], 3) or d.dtype != np.int16:
                raise DataError(
                    f"{at}: '{mod}.dates.npy' is {d.dtype}{d.shape}; expected int16 ({x.shape[0]}, 3) for {x.shape[0]} dates"
                )
            v = self.valid.get(mod)
            if v is not None and (v.shape != (x.shape[0], *x.shape[2:]) or v.dtype != np.uint8):
                raise DataError(
                    f"{at}: '{mod}.valid.npy' is {v.dtype}{v.shape}; expected uint8 {(x.shape[0], *x.shape[2:])}"
                )
        extra = set(self.dates) - set(self.arrays)
        if extra:
            raise DataError(f"{at}: dates for unknown modalities {sorted(extra)}")


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def encode(sample: Sample) -> dict[str, bytes]:
    """Tar members of a sample as {suffix: bytes} (suffix = member name after `KEY.`)."""
    sample.check()
    out: dict[str, bytes] = {}
    for mod, x in sample.arrays.items():
        out[f"{mod}.npy"] = _npy_bytes(x)
        out[f"{mod}.dates.npy"] = _npy_bytes(sample.dates[mod].astype(np.int16))
        if mod in sample.valid:
            out[f"{mod}.valid.npy"] = _npy_bytes(sample.valid[mod].astype(np.uint8))
    for name, y in sample.targets.items():
        out[f"{name}.npy"] = _npy_bytes(y)
    meta = dict(sample.meta, modalities=list(sample.arrays), targets=list(sample.targets))
    out["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return out


_NPY_MAGIC = b"\x93NUMPY"
# The header `np.save` writes: {'descr': '<f4', 'fortran_order': False, 'shape': (T, C, H, W), }
_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=][a-zA-Z]\d*)', 'fortran_order': False, 'shape': \(([\d, ]*)\), \} *\n"
)


def _npy_view(data: bytes) -> np.ndarray | None:
    """A read-only view over the array bytes of a plain C-order `.npy`; None for any other header."""
    if data[:6] != _NPY_MAGIC or len(data) < 10:
        return None
    if data[6] == 1:
        head_at = 10
    elif data[6] in (2, 3):
        head_at = 12
    else:
        return None
    start = head_at + int.from_bytes(data[8:head_at], "little")
    head = _NPY_HEADER.fullmatch(data, head_at, start)
    if head is None:
        return None
    dtype = np.dtype(head[1].decode())
    shape = tuple(int(n) for n in head[2].split(b",") if n.strip())
    count = math.prod(shape)  # exact: a forged header's product must not wrap around
    if dtype.hasobject or len(data) - start < count * dtype.itemsize:
        return None  # np.load below refuses these with its own message
    return np.frombuffer(data, dtype, count, start).reshape(shape)


def load_npy(data: bytes, where: str) -> np.ndarray:
    """Decode `.npy` bytes without ever unpickling; `where` names the member in errors.

    The headers `np.save` writes for plain arrays are parsed here and the array is a read-only
    view over `data` (no copy); anything else (Fortran order, structured or object dtypes, short
    data) goes through `np.load(allow_pickle=False)`, which refuses what needs pickle.
    """
    view = _npy_view(data)
    if view is not None:
        return view
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:  # object arrays need pickle: refused
        raise DataError(f"{where}: refused to decode (pickled or malformed .npy: {e})") from e
    except Exception as e:
        raise DataError(f"{where}: unreadable .npy ({e.__class__.__name__}: {e})") from e


def decode(key: str, members: dict[str, bytes], where: str = "") -> Sample:
    """Build a Sample from raw members {suffix: bytes}; refuses anything but .npy and .json."""
    at = f"{where}sample '{key}'"
    if "meta.json" not in members:
        raise DataError(f"{at}: 'meta.json' is missing")
    for suffix in members:
        if not (suffix.endswith(".npy") or suffix.endswith(".json")):
            raise DataError(f"{at}: member '{key}.{suffix}' is neither .npy nor .json; refusing to decode it")
    try:
        meta = json.loads(members["meta.json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{at}: 'meta.json' is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise DataError(f"{at}: 'meta.json' is {type(meta).__name__}; expected a JSON object")
    mods, targets = meta.get("modalities"), meta.get("targets")
    if mods is None:  # written by another tool (e.g. webdataset's TarWriter): the members say
        mods = sorted(s[: -len(".dates.npy")] for s in members if s.endswith(".dates.npy"))
    if targets is None:
        derived = {f"{m}{end}" for m in mods for end in (".npy", ".dates.npy", ".valid.npy")}
        targets = sorted(s[: -len(".npy")] for s in members if s.endswith(".npy") and s not in derived)
    arrays, dates, valid, tgts = {}, {}, {}, {}
    for mod in mods:
        for suffix, dest in ((f"{mod}.npy", arrays), (f"{mod}.dates.npy", dates)):
            if suffix not in members:
                raise DataError(f"{at}: member '{suffix}' listed in meta.json is missing")
            dest[mod] = load_npy(members[suffix], f"{at} member '{suffix}'")
        if f"{mod}.valid.npy" in members:
            valid[mod] = load_npy(members[f"{mod}.valid.npy"], f"{at} member '{mod}.valid.npy'")
    for name in targets:
        if f"{name}.npy" not in members:
            raise DataError(f"{at}: target member '{name}.npy' listed in meta.json is missing")
        tgts[name] = load_npy(members[f"{name}.npy"], f"{at} member '{name}.npy'")
    known = {"meta.json"} | {f"{n}.npy" for n in [*mods, *targets]}
    known |= {f"{m}.dates.npy" for m in mods} | {f"{m}.valid.npy" for m in mods}
    unknown = set(members) - known
    if unknown:
        raise DataError(f"{at}: members {sorted(unknown)} are not listed in meta.json")
    meta = {k: v for k, v in meta.items() if k not in ("modalities", "targets")}
    s = Sample(key, arrays, dates, valid, tgts, meta)
    s.check(where)
    return s


def check_values(sample: Sample, specs: dict[str, dict[str, Any]], where: str = "") -> None:
    """Refuse (DataError naming the sample, member and value) values no model should train on.

    `specs` maps modality names to spec fields (`dtype`, `num_dates`; a manifest's `modalities`
    or the loader's specs as dicts); modalities not in it are not checked. An array's dtype is
    wrong when the modality's dtype cannot hold all its values (int16 for uint16, float64 for
    float32; uint8 or float16 for float32 is fine). The loader calls this
    for every sample it decodes, verify for every sample of a split.
    """
    at = f"{where}sample '{sample.key}'"
    for mod, x in sample.arrays.items():
        spec = specs.get(mod)
        if spec is None:
            continue
        if x.dtype.kind not in "buif" or not np.can_cast(x.dtype, spec["dtype"], "safe"):
            raise DataError(
                f"{at}: '{mod}.npy' is {x.dtype}; the modality stores {spec['dtype']}, which cannot "
                f"hold every {x.dtype} value (set data.modalities.{mod}.dtype, or write {spec['dtype']})"
            )
        if x.shape[0] == 0:
            kind = "temporal modality" if spec["num_dates"] > 1 else "modality"
            raise DataError(f"{at}: '{mod}.npy' has 0 dates; a {kind} needs at least one")
        doy = sample.dates[mod][:, 1]
        if doy.min() < 1 or doy.max() > 366:
            bad = int(np.flatnonzero((doy < 1) | (doy > 366))[0])
            row = tuple(int(v) for v in sample.dates[mod][bad])
            unset = " (an unset date)" if row == (0, 0, 0) else ""
            raise DataError(
                f"{at}: '{mod}.dates.npy' row {bad} is {row}{unset}; day of year must be in 1-366"
            )
        # All-NaN arrays are rare: look at every value only when the first one is NaN.
        if x.dtype.kind == "f" and np.isnan(x.flat[0]) and np.isnan(x).all():
            raise DataError(f"{at}: '{mod}.npy' is NaN everywhere; nothing in it to learn from")
