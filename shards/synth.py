"""Synthetic archives with the modalities, bands, sizes, dtypes and date patterns of a preset.

Each sample is a small landscape: a few fields (Voronoi cells) with a land-cover class each. A class
has a seasonal vegetation curve (NDVI over the day of year), a colour, a height and a radar
response, so every modality sees the same fields, bands are correlated through the curve, and the
labels (multi-label fractions or class rasters) can be predicted from the time series. Sentinel-2
gets clouds (and their valid mask), Sentinel-1 gets multiplicative speckle and the odd NaN, S1
descending gets same-day duplicate slices, and dates are irregular. A sample depends only on
(preset, seed, index), so archives are deterministic and can be generated in parallel.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import numpy as np
from einops import rearrange, repeat

from maestro import modalities as registry
from maestro import storage
from maestro.modalities import DatasetPreset, ModalitySpec
from shards import valid as valid_masks
from shards.schema import Sample, sample_key
from shards.writer import DEFAULT_SHARD_BYTES, ShardWriter, raw_band_names, write_split

# Dates per series (min, max) for S2 and S1 (per orbit), as in the real archives where they are known.
DATE_RANGES = {
    "treesatai_ts": {"s2": (40, 150), "s1": (60, 120)},
    "pastis_hd": {"s2": (38, 61), "s1": (50, 70)},
}
DEFAULT_DATE_RANGE = {"s2": (20, 60), "s1": (20, 60)}
CRS = {
    "treesatai_ts": "EPSG:25832",
    "pastis_hd": "EPSG:2154",
    "flair_hub": "EPSG:2154",
    "flair2": "EPSG:2154",
}
_CLASS_SEED = 20250814  # class physics are the dataset's, not the sample's: fixed


def kind(spec: ModalitySpec) -> str:
    """What the bands say the sensor is: 's2', 's1', 'dem' or 'vhr' (aerial, SPOT, NAIP)."""
    if "VV" in spec.bands:
        return "s1"
    if "B04" in spec.bands:
        return "s2"
    if {"dsm", "ndsm"} & set(spec.bands):
        return "dem"
    return "vhr"


def source_size(spec: ModalitySpec, tile_m: float) -> int:
    """Side in pixels of a modality's stored tile (the aerial shift margin included)."""
    return registry.pixels(spec, tile_m) + 2 * spec.shift_px


def raw_channels(spec: ModalitySpec) -> int:
    return max(spec.source_channels) + 1 if spec.source_channels else len(spec.bands)


@dataclasses.dataclass(frozen=True)
class SynthItem:
    """One sample to generate (picklable, so writer processes can build it)."""

    preset: str
    seed: int
    index: int
    split: str
    sizes: tuple[tuple[str, int], ...] = ()
    max_dates: int | None = None

    @property
    def sample_id(self) -> str:
        return f"{self.preset}_{self.split}_{self.seed}_{self.index:07d}"


@dataclasses.dataclass
class Scene:
    """A generated sample before encoding; `masks` holds S2 (T, 2, H, W) snow/cloud probabilities 0-100."""

    arrays: dict[str, np.ndarray]
    dates: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    fractions: np.ndarray  # (K,) area fraction of each class
    class_maps: dict[str, np.ndarray]  # modality -> (H, W) class ids
    year: int
    bounds: list[float]


def _classes(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(_CLASS_SEED)
    return {
        "peak": rng.uniform(110, 240, n),
        "width": rng.uniform(25, 80, n),
        "amp": rng.uniform(0.15, 0.7, n),
        "base": rng.uniform(0.05, 0.3, n),
        "height": rng.uniform(0, 25, n),
        "tone": rng.uniform(0.6, 1.4, n),
    }


def num_classes(p: DatasetPreset) -> int:
    return next(iter(p.targets.values())).num_classes if p.targets else 8


def ndvi(cls: dict[str, np.ndarray], class_map: np.ndarray, doy: np.ndarray) -> np.ndarray:
    """(T,) days of year and (H, W) classes -> (T, H, W) seasonal vegetation index."""
    c = class_map[None]
    d = doy[:, None, None].astype(np.float64)
    return cls["base"][c] + cls["amp"][c] * np.exp(-(((d - cls["peak"][c]) / cls["width"][c]) ** 2))


def _class_map(seeds: np.ndarray, labels: np.ndarray, size: int) -> np.ndarray:
    """Nearest-seed class of every pixel centre of a size×size grid over the unit square."""
    u = (np.arange(size) + 0.5) / size
    best = np.full((size, size), np.inf)
    out = np.zeros((size, size), np.int64)
    for (sy, sx), label in zip(seeds, labels):
        d = (u[:, None] - sy) ** 2 + (u[None, :] - sx) ** 2  # (H, W)
        out[d < best] = label
        best = np.minimum(best, d)
    return out


def _dates(rng: np.random.Generator, year: int, lo: int, hi: int, hour: int, dup: float) -> np.ndarray:
    """(T, 3) int16 sorted irregular dates of one year; `dup` = share of same-day duplicate slices."""
    days_in_year = 366 if year % 4 == 0 else 365
    t = int(rng.integers(lo, hi + 1))
    n_days = min(days_in_year, max(1, round(t / (1 + dup))))
    doy = np.sort(rng.choice(np.arange(1, days_in_year + 1), n_days, replace=False))
    doy = np.sort(np.concatenate([doy, rng.choice(doy, t - n_days)])) if t > n_days else doy
    out = np.zeros((len(doy), 3), np.int16)
    out[:, 0], out[:, 1], out[:, 2] = year, doy, hour
    return out


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) smooth noise in [-1, 1]: a coarse random grid, upsampled."""
    coarse = rng.uniform(-1, 1, (cells, cells))
    idx = np.minimum((np.arange(size) * cells) // size, cells - 1)
    return coarse[np.ix_(idx, idx)]


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    return x.astype(dtype)


def _s2(rng, cls, cmap, dates, spec) -> tuple[np.ndarray, np.ndarray]:
    t, (h, w) = len(dates), cmap.shape
    v = ndvi(cls, cmap, dates[:, 1]) + rng.normal(0, 0.03, (t, h, w))  # (T, H, W)
    bright = 1 + 0.1 * _smooth_noise(rng, h, 3)
    visible = np.array([450, 650, 550, 1100])[:, None, None, None] * (1.2 - v)
    nir = np.array([2000, 2500, 2800, 2950])[:, None, None, None] * (0.35 + v)
    swir = np.array([2200, 1300])[:, None, None, None] * (1.1 - 0.6 * v)
    x = rearrange(np.concatenate([visible, nir, swir]) * bright, "c t h w -> t c h w")  # (T, 10, H, W)
    cloud = np.zeros((t, h, w))
    cloudy = rng.random(t) < 0.3
    for i in np.flatnonzero(cloudy):
        blob = np.clip(_smooth_noise(rng, h, 2) + rng.uniform(-0.5, 1), 0, 1)  # partial or full cover
        cloud[i] = np.rint(100 * blob)
        x[i] += 6000 * blob[None]
    x *= rng.lognormal(0, 0.02, x.shape)
    return _cast(np.maximum(x, 1), spec.dtype), cloud


def _s1(rng, cls, cmap, dates, spec) -> np.ndarray:
    t, (h, w) = len(dates), cmap.shape
    v = ndvi(cls, cmap, dates[:, 1])  # (T, H, W)
    db = np.stack([-13 + 6 * v, -20 + 8 * v], 1) + rng.normal(0, 0.5, (t, 1, 1, 1))  # (T, 2, H, W)
    linear = 10 ** (db / 10) * rng.gamma(4.0, 1 / 4.0, db.shape)  # 4-look speckle
    x = linear if spec.log_scale else 10 * np.log10(linear)
    extra = raw_channels(spec) - 2
    if extra > 0:  # the PASTIS-R layout's third channel: the VV/VH ratio
        x = np.concatenate([x, repeat(x[:, 0] / x[:, 1], "t h w -> t e h w", e=extra)], 1)
    x = x.astype(spec.dtype)
    if rng.random() < 0.2:  # the real archives hold a few NaN pixels
        x[rng.integers(t), :, rng.integers(h), rng.integers(w)] = np.nan
    return x


def _vhr(rng, cls, cmap, doy, spec) -> np.ndarray:
    h = cmap.shape[0]
    v = ndvi(cls, cmap, np.array([doy]))[0]  # (H, W)
    tone = cls["tone"][cmap] * (1 + 0.15 * _smooth_noise(rng, h, max(2, h // 16)))
    level = {"nir": 90 + 140 * v, "red": 120 - 70 * v, "green": 110 - 30 * v, "blue": 100 - 50 * v}
    names = raw_band_names(spec, raw_channels(spec))
    x = np.stack([level.get(n, 100 + 0 * v) * tone for n in names])[None].astype(np.float32)  # (1, C, H, W)
    x += 6 * rng.standard_normal(x.shape, dtype=np.float32)
    scale = 8.0 if np.dtype(spec.dtype) == np.uint16 else 1.0
    return _cast(x * scale, spec.dtype)


def _dem(rng, cls, cmap, spec) -> np.ndarray:
    h, w = cmap.shape
    ramp = np.linspace(0, rng.uniform(-5, 5), w)[None, :] + np.linspace(0, rng.uniform(-5, 5), h)[:, None]
    dtm = rng.uniform(20, 400) + ramp + _smooth_noise(rng, h, 4)
    height = cls["height"][cmap] * (1 + 0.2 * rng.random((h, w)))
    layers = {"dsm": dtm + height, "dtm": dtm, "ndsm": height}  # nDSM: height above ground
    return _cast(np.stack([layers[b] for b in spec.bands])[None], spec.dtype)  # (1, C, H, W)


def make_scene(item: SynthItem) -> Scene:
    p = registry.preset(item.preset)
    sizes = dict(item.sizes)
    rng = np.random.default_rng([item.seed, item.index])
    k = num_classes(p)
    cls = _classes(k)
    n_fields = int(rng.integers(2, 7))
    seeds = rng.random((n_fields, 2))
    labels = np.where(rng.random(n_fields) < 0.7, rng.integers(k), rng.choice(k, n_fields))  # a main class
    year = int(p.ref_date[:4]) if p.ref_date[:1].isdigit() else int(rng.integers(2017, 2021))
    ranges = DATE_RANGES.get(item.preset, DEFAULT_DATE_RANGE)
    scene = Scene({}, {}, {}, np.zeros(k), {}, year, [])
    for mod, spec in p.modalities.items():
        size = sizes.get(mod, source_size(spec, p.tile_m))
        cmap = _class_map(seeds, labels, size)
        scene.class_maps[mod] = cmap
        sensor = kind(spec)
        if sensor in ("s2", "s1"):
            lo, hi = ranges[sensor]
            if item.max_dates:
                lo, hi = min(lo, item.max_dates), min(hi, item.max_dates)
            hour = 10 if sensor == "s2" else (17 if mod.endswith("asc") else 5)
            dup = 0.9 if mod.endswith("des") else 0.0
            dates = _dates(rng, year, lo, hi, hour, dup)
            if sensor == "s2":
                scene.arrays[mod], cloud = _s2(rng, cls, cmap, dates, spec)
                scene.masks[mod] = np.stack([np.zeros_like(cloud), cloud], 1).astype(np.float32)
            else:
                scene.arrays[mod] = _s1(rng, cls, cmap, dates, spec)
        else:
            dates = np.array([[year, dt.date(year, 7, 1).timetuple().tm_yday, 0]], np.int16)
            gen = (
                _dem(rng, cls, cmap, spec)
                if sensor == "dem"
                else _vhr(rng, cls, cmap, int(dates[0, 1]), spec)
            )
            scene.arrays[mod] = gen
        scene.dates[mod] = dates
    finest = max(scene.class_maps, key=lambda m: scene.class_maps[m].size)
    scene.fractions = (
        np.bincount(scene.class_maps[finest].ravel(), minlength=k) / scene.class_maps[finest].size
    )
    x0, y0 = 400000 + 1000 * (item.index % 100), 5800000 + 1000 * (item.index // 100)
    extent = max(scene.class_maps[m].shape[0] * p.modalities[m].resolution_m for m in p.modalities)
    scene.bounds = [x0, y0, x0 + extent, y0 + extent]
    return scene


def targets(p: DatasetPreset, scene: Scene) -> dict[str, np.ndarray]:
    """Labels of a scene for each of the preset's targets."""
    out = {}
    for name, t in p.targets.items():
        if t.kind == "multilabel":
            thresh = 0.07 if name.endswith("thresh") else 0.0
            out[name] = (scene.fractions > thresh).astype(np.uint8)
        else:  # a class raster at the resolution of the finest modality
            finest = max(scene.class_maps, key=lambda m: scene.class_maps[m].size)
            out[name] = (scene.class_maps[finest] % t.num_classes).astype(np.uint8)
    return out


def read_item(item: SynthItem) -> Sample:
    """The Sample of a synthetic item (the `read` function of `write_split`)."""
    p = registry.preset(item.preset)
    scene = make_scene(item)
    valid = {m: valid_masks.from_cloud(c, p.modalities[m].cloud_threshold) for m, c in scene.masks.items()}
    for mod, x in scene.arrays.items():
        v = None if mod in valid else valid_masks.from_nodata(x)
        if v is not None:
            valid[mod] = v
    ref = scene.dates[p.ref_date][0] if p.ref_date in scene.dates else _fixed_date(p.ref_date)
    meta = {
        "id": item.sample_id,
        "split": item.split,
        "ref_date": [int(v) for v in ref],
        "crs": CRS.get(item.preset, "EPSG:3857"),
        "bounds": scene.bounds,
        "source": f"synthetic {item.preset} seed={item.seed} index={item.index}",
        "licence": "synthetic data, no restriction",
    }
    if any(t.kind == "multilabel" for t in p.targets.values()):
        names = next(iter(p.targets.values())).classes
        meta["fractions"] = {n: round(float(f), 5) for n, f in zip(names, scene.fractions) if f > 0}
    return Sample(sample_key(item.sample_id), scene.arrays, scene.dates, valid, targets(p, scene), meta)


def _fixed_date(text: str) -> list[int]:
    d = dt.date.fromisoformat(text)
    return [d.year, d.timetuple().tm_yday, 0]


def items(
    preset_name: str, samples: int, seed: int, split: str, sizes: dict[str, int] | None, max_dates: int | None
) -> list[SynthItem]:
    frozen = tuple(sorted((sizes or {}).items()))
    return [SynthItem(preset_name, seed, i, split, frozen, max_dates) for i in range(samples)]


def write_synthetic(
    out_url: str,
    preset: str = "treesatai_ts",
    samples: int = 100,
    seed: int = 0,
    *,
    split: str = "train",
    sizes: dict[str, int] | None = None,
    max_dates: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    shard_samples: int | None = None,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = False,
    ray: str | None = None,
) -> dict[str, Any]:
    """Write a synthetic split to `out_url/split` and return its manifest.

    `sizes` overrides the stored side in pixels per modality (small tiles for tests), `max_dates`
    caps the number of dates per series; otherwise the preset's real sizes and date counts apply.
    `ray` (a Ray address, "" for a local Ray of `workers` CPUs) writes one Ray task per shard
    (`shards.fanout`); None writes in this process with `workers` reader processes.
    """
    p = registry.preset(preset)
    todo = items(preset, samples, seed, split, sizes, max_dates)
    spec = {
        "dataset": preset,
        "modalities": p.modalities,
        "targets": p.targets,
        "source": f"synthetic (maestro shards synth, seed {seed})",
    }
    url = storage.join(out_url, split)
    if ray is not None:
        from shards.fanout import write_split_ray

        return write_split_ray(
            url, split, read_item, todo, **spec, shard_bytes=shard_bytes, shard_samples=shard_samples,
            overwrite=overwrite, address=ray, cpus=workers,
        )  # fmt: skip
    writer = ShardWriter(
        url, split=split, **spec, shard_bytes=shard_bytes, shard_samples=shard_samples, overwrite=overwrite
    )
    return write_split(writer, read_item, todo, workers=workers, progress=progress)
