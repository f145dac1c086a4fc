"""The modality registry: the one source of truth for every sensor maestro knows.

A `ModalitySpec` says everything the converters, the loader, the model and the loss need about a
modality: its bands and their order, how raw channels are selected, the band groups of the patch
embedding, the `norm_bands` groups of the reconstruction targets, ground resolution, in-model image
and patch size, number of dates, value scaling, nodata and fusion group. Dataset presets reproduce
the reference configurations (maestro_reference.md §4); a user's own sensor is a YAML entry under
`data.modalities` that is validated exactly like a preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from maestro.errors import ConfigError

S2_BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
TREESAT_GENERA = [
    "Betula", "Cleared", "Quercus", "Larix", "Fraxinus", "Alnus", "Pseudotsuga", "Prunus",
    "Fagus", "Acer", "Abies", "Pinus", "Tilia", "Picea", "Populus",
]  # fmt: skip


@dataclass
class ModalitySpec:
    """One modality as the framework sees it.

    `bands` are the channels the model sees, in model order. `source_channels` selects and reorders
    them from the raw array stored in the shards (None: the raw channels as they are). `band_groups`
    and `norm_bands` are sizes of consecutive channel groups; both must sum to `len(bands)`.
    """

    bands: list[str]
    resolution_m: float
    image_size: int
    patch_size: int
    num_dates: int = 1
    source_channels: list[int] | None = None
    band_groups: list[int] | None = None
    norm_bands: list[int] | None = None
    norm_fac: float | None = None
    log_scale: bool = False
    rescale_elev: bool = False
    nodata: float | None = None
    cloud_threshold: float | None = None
    shift_px: int = 0
    dtype: str = "float32"
    group: str = ""
    embed: str = ""
    dates: Literal["bins", "all"] = "bins"

    @property
    def channels(self) -> int:
        return len(self.bands)

    @property
    def groups(self) -> list[int]:
        """Token band-group sizes (patch embedding); one group of all bands by default."""
        return list(self.band_groups) if self.band_groups else [self.channels]

    @property
    def norm_groups(self) -> list[int]:
        """Target normalization group sizes; the token band groups when `norm_bands` is unset."""
        return list(self.norm_bands) if self.norm_bands else self.groups

    @property
    def grid(self) -> int:
        """Token grid side `g = image_size / patch_size`."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_date(self) -> int:
        return self.grid * self.grid

    @property
    def tokens(self) -> int:
        """Tokens per sample, `N · G · g²`, with the reference's fixed number of dates."""
        return self.num_dates * len(self.groups) * self.tokens_per_date

    @property
    def temporal(self) -> bool:
        return self.num_dates > 1


def validate_modality(name: str, spec: ModalitySpec, key: str) -> ModalitySpec:
    """Check a spec's internal consistency and fill defaults; `key` names it in errors."""
    if not spec.bands:
        raise ConfigError(f"{key}.bands", spec.bands, "a non-empty list of band names")
    c = spec.channels
    for fname in ("resolution_m", "image_size", "patch_size", "num_dates"):
        if getattr(spec, fname) <= 0:
            raise ConfigError(f"{key}.{fname}", getattr(spec, fname), "a positive number")
    if spec.image_size % spec.patch_size:
        raise ConfigError(
            f"{key}.patch_size",
            spec.patch_size,
            f"a divisor of image_size={spec.image_size} (e.g. "
            f"{[p for p in range(1, spec.image_size + 1) if spec.image_size % p == 0][-4:]})",
        )
    for fname in ("band_groups", "norm_bands"):
        sizes = getattr(spec, fname)
        if sizes is not None and (sum(sizes) != c or any(s <= 0 for s in sizes)):
            raise ConfigError(
                f"{key}.{fname}", sizes, f"positive group sizes summing to the {c} bands {spec.bands}"
            )
    if spec.source_channels is not None:
        if len(spec.source_channels) != c:
            raise ConfigError(
                f"{key}.source_channels", spec.source_channels, f"{c} raw channel indices, one per band"
            )
        if any(i < 0 for i in spec.source_channels):
            raise ConfigError(f"{key}.source_channels", spec.source_channels, "non-negative channel indices")
    if spec.norm_fac is not None and spec.norm_fac <= 0:
        raise ConfigError(f"{key}.norm_fac", spec.norm_fac, "a positive divisor or null")
    if spec.rescale_elev and c < 2:
        raise ConfigError(f"{key}.rescale_elev", True, "at least 2 bands (elevation, then references)")
    return dataclasses.replace(spec, group=spec.group or name, embed=spec.embed or name)


@dataclass
class TargetSpec:
    """A downstream label stored beside the inputs (not used by pretraining).

    Segmentation targets also say their ground resolution and the input modality whose token grid
    their head predicts from (the reference's `ref_input`)."""

    kind: Literal["multilabel", "segmentation", "classification"]
    num_classes: int
    missing: int = -1
    classes: list[str] = field(default_factory=list)
    reference: str = ""
    resolution_m: float = 0.0


@dataclass
class DatasetPreset:
    """A dataset's modalities (in the reference's `filter_inputs` order) and geometry."""

    modalities: dict[str, ModalitySpec]
    inputs: list[str]
    grid_pos_enc: int
    tile_m: float
    crop_m: float
    ref_date: str  # a modality name whose (single) date is the reference, or a fixed YYYY-MM-DD
    targets: dict[str, TargetSpec] = field(default_factory=dict)


def _s1(res: float, size: int, *, log: bool, fac: float, source: list[int] | None = None) -> ModalitySpec:
    return ModalitySpec(
        bands=["VV", "VH"], resolution_m=res, image_size=size, patch_size=2, num_dates=4,
        source_channels=source, norm_bands=[1, 1], norm_fac=fac, log_scale=log, group="s1",
    )  # fmt: skip


def _s2(res: float, size: int, fac: float, dtype: str, cloud: float | None) -> ModalitySpec:
    return ModalitySpec(
        bands=list(S2_BANDS), resolution_m=res, image_size=size, patch_size=2, num_dates=16,
        norm_bands=[4, 4, 2], norm_fac=fac, dtype=dtype, cloud_threshold=cloud,
    )  # fmt: skip


def _treesatai_ts() -> DatasetPreset:
    mods = {
        "aerial": ModalitySpec(
            bands=["nir", "green", "blue", "red"], resolution_m=0.2, image_size=300, patch_size=20,
            norm_bands=[1, 3], norm_fac=255.0, dtype="uint8", shift_px=2,
        ),
        "s2": _s2(10.0, 6, 5000.0, "float32", cloud=0.0),
        "s1_asc": _s1(10.0, 6, log=True, fac=5.0),
        "s1_des": _s1(10.0, 6, log=True, fac=5.0),
    }  # fmt: skip
    targets = {
        "treesat_mlc_thresh": TargetSpec("multilabel", 15, -1, list(TREESAT_GENERA)),
        "treesat_mlc": TargetSpec("multilabel", 15, -1, list(TREESAT_GENERA)),
    }
    return DatasetPreset(mods, list(mods), 96, 60.0, 60.0, "aerial", targets)


def _pastis_hd() -> DatasetPreset:
    mods = {
        "spot": ModalitySpec(
            bands=["red", "green", "blue"], resolution_m=1.0, image_size=160, patch_size=16,
            norm_fac=255.0, dtype="uint8",
        ),
        "s2": _s2(10.0, 16, 10000.0, "int16", cloud=None),
        "s1_asc": _s1(10.0, 16, log=False, fac=20.0, source=[0, 1]),
        "s1_des": _s1(10.0, 16, log=False, fac=20.0, source=[0, 1]),
    }  # fmt: skip
    targets = {"pastis_seg": TargetSpec("segmentation", 19, 19, reference="s2", resolution_m=10.0)}
    return DatasetPreset(mods, list(mods), 256, 1280.0, 160.0, "2019-07-01", targets)


def _flair_hub() -> DatasetPreset:
    mods = {
        "aerial": ModalitySpec(
            bands=["nir", "red", "green", "blue"], resolution_m=0.2, image_size=512, patch_size=16,
            source_channels=[3, 0, 1, 2], norm_bands=[1, 3], norm_fac=255.0, dtype="uint8",
        ),
        "dem": ModalitySpec(
            bands=["dsm", "dtm"], resolution_m=0.2, image_size=512, patch_size=32,
            norm_fac=1000.0, rescale_elev=True, dtype="float32",
        ),
        "s2": _s2(10.24, 10, 5000.0, "uint16", cloud=0.0),
        "s1_asc": _s1(10.24, 10, log=True, fac=5.0),
        "s1_des": _s1(10.24, 10, log=True, fac=5.0),
        "spot": ModalitySpec(
            bands=["red", "green", "blue", "nir"], resolution_m=1.6, image_size=64, patch_size=4,
            norm_fac=2000.0, dtype="uint16",
        ),
    }  # fmt: skip
    targets = {
        "cosia": TargetSpec("segmentation", 15, -1, reference="aerial", resolution_m=0.2),
        "lpis": TargetSpec("segmentation", 74, -1, reference="aerial", resolution_m=0.2),
    }
    return DatasetPreset(
        mods, ["aerial", "dem", "s2", "s1_asc", "s1_des"], 160, 102.4, 102.4, "aerial", targets
    )


def _flair2() -> DatasetPreset:
    # FLAIR#2 = FLAIR-HUB refiltered, aerial + DEM + S2 only (reference `version=flair2`). The
    # original FLAIR#2 release has no DSM/DTM pair: its elevation is the aerial's 5th band, an
    # nDSM (height above ground, uint8), which `maestro shards convert flair2` writes as `dem`.
    hub = _flair_hub()
    hub.modalities["dem"] = ModalitySpec(
        bands=["ndsm"], resolution_m=0.2, image_size=512, patch_size=32, norm_fac=255.0, dtype="uint8"
    )
    return dataclasses.replace(
        hub,
        inputs=["aerial", "dem", "s2"],
        targets={"cosia": TargetSpec("segmentation", 15, -1, reference="aerial", resolution_m=0.2)},
    )


def _s2_naip() -> DatasetPreset:
    mods = {
        "aerial": ModalitySpec(
            bands=["nir", "red", "green", "blue"], resolution_m=1.25, image_size=384, patch_size=16,
            source_channels=[3, 0, 1, 2], norm_bands=[1, 3], norm_fac=255.0, dtype="uint8",
        ),
        "spot": ModalitySpec(
            bands=["red", "green", "blue"], resolution_m=1.25, image_size=128, patch_size=16,
            source_channels=[0, 1, 2], norm_fac=255.0, dtype="uint8",
        ),
        "s2": _s2(10.0, 12, 5000.0, "uint16", cloud=None),
        "s1": dataclasses.replace(_s1(10.0, 12, log=False, fac=20.0), group="s1"),
    }  # fmt: skip
    return DatasetPreset(mods, list(mods), 192, 640.0, 120.0, "aerial")


PRESETS = {
    "treesatai_ts": _treesatai_ts,
    "pastis_hd": _pastis_hd,
    "flair_hub": _flair_hub,
    "flair2": _flair2,
    "s2_naip": _s2_naip,
}


def preset(name: str) -> DatasetPreset:
    """A fresh copy of a dataset preset (callers may modify it)."""
    if name not in PRESETS:
        raise ConfigError("data.dataset", name, f"one of {sorted(PRESETS)}")
    return PRESETS[name]()


def pixels(spec: ModalitySpec, metres: float) -> int:
    """Pixels of a modality across `metres` of ground: a tile's or a loader crop's side (before the
    in-model resize to image_size)."""
    return round(metres / spec.resolution_m)
