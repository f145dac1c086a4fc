"""FLAIR #2: zone folders of aerial patches with one Sentinel-2 super-patch per zone.

Layout (datasets.md §4.3): `flair_aerial_train/D{ddd}_{YYYY}/Z{n}_{XX}/img/IMG_{id}.tif` (5 bands
R,G,B,NIR,nDSM uint8: R,G,B,NIR become `aerial`, the nDSM band the preset's one-band `dem`), labels
`flair_labels_train/.../msk/MSK_{id}.tif`, `flair_sen_train/.../sen/SEN2_*_{data,masks}.npy`
(T,10,H,W) and (T,2,H,W) snow/cloud probabilities, `SEN2_*_products.txt` (product names), and
`flair-2_centroids_sp_to_patch.json` ({IMG: [row, col]} in super-patch pixels). Test folders are
`flair_2_*_test`. Each sample gets the S2 window of the preset's tile (10×10 pixels, the aerial
patch's 102.4 m) centred on its centroid (shifted inside the super-patch at its edges), all dates
kept, so the loader's crop grid lines S2 up with the aerial patch. Dates come from the product names; the aerial date from
`flair_aerial_metadata.json` when present, else July 1 of the domain's year.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from pathlib import Path

import numpy as np

from maestro.errors import DataError
from maestro.modalities import pixels, preset
from shards import valid
from shards.convert import dates, geotiff
from shards.schema import Sample, load_npy, sample_key

PRESET = "flair2"
FOLDERS = {"train": "flair_{}_train", "test": "flair_2_{}_test"}
CENTROIDS = "flair-2_centroids_sp_to_patch.json"
S2_WINDOW = pixels(preset(PRESET).modalities["s2"], preset(PRESET).tile_m)
NDSM_BAND = 4  # the 5th aerial band
# Product names may run together on one line in some copies, so they are matched, not split by line.
PRODUCT = re.compile(r"S2[A-D]_MSI\w{3}_\d{8}T\d{6}_N\d{4}_R\d{3}_T\w{5}_\d{8}T\d{6}")
LICENCE = "Etalab Licence Ouverte 2.0 (FLAIR #2, IGN)"


@dataclasses.dataclass(frozen=True)
class Item:
    root: Path
    split: str
    image: str  # path of IMG_*.tif relative to root

    @property
    def sample_id(self) -> str:
        return Path(self.image).stem


def required(split: str) -> list[str]:
    return [FOLDERS[split].format(k) for k in ("aerial", "labels", "sen")] + [CENTROIDS]


def splits(root: Path) -> list[str]:
    return [s for s, f in FOLDERS.items() if (root / f.format("aerial")).is_dir()]


def items(root: Path, split: str) -> list[Item]:
    images = sorted((root / FOLDERS[split].format("aerial")).glob("*/*/img/IMG_*.tif"))
    return [Item(root, split, str(p.relative_to(root))) for p in images]


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable JSON ({e})") from e


def _window(centre: int, size: int, where: str) -> slice:
    if size < S2_WINDOW:
        raise DataError(f"{where}: super-patch side {size} is smaller than the {S2_WINDOW}-pixel window")
    start = min(max(centre - S2_WINDOW // 2, 0), size - S2_WINDOW)
    return slice(start, start + S2_WINDOW)


def _sentinel(item: Item, zone: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    sen = item.root / FOLDERS[item.split].format("sen") / zone / "sen"
    found = sorted(sen.glob("SEN2_*_data.npy"))
    if not found:
        raise DataError(f"{sen}: no SEN2_*_data.npy for {item.image}")
    data_path = found[0]
    x = load_npy(data_path.read_bytes(), str(data_path))
    if x.ndim != 4 or x.shape[1] != 10:
        raise DataError(f"{data_path}: shape {x.shape}; expected (T, 10, H, W)")
    mask_path = data_path.with_name(data_path.name.replace("_data.npy", "_masks.npy"))
    masks = load_npy(mask_path.read_bytes(), str(mask_path)) if mask_path.is_file() else None
    if masks is not None and masks.ndim == 3:  # single-channel copies: (T, H, W)
        masks = masks[:, None]
    if masks is None or masks.shape[0] != x.shape[0] or masks.shape[2:] != x.shape[2:]:
        got = None if masks is None else masks.shape
        raise DataError(f"{mask_path}: masks {got} do not match data {x.shape}; expected (T, 2, H, W)")
    prod_path = data_path.with_name(data_path.name.replace("_data.npy", "_products.txt"))
    if not prod_path.is_file():
        raise DataError(f"{prod_path}: missing")
    products = PRODUCT.findall(prod_path.read_text())
    if len(products) != x.shape[0]:
        raise DataError(
            f"{prod_path}: {len(products)} product names for {x.shape[0]} dates in {data_path.name}"
        )
    return x, masks, dates.from_products(products, str(prod_path)), str(data_path.relative_to(item.root))


def _ref_date(item: Item, zone: Path) -> tuple[dt.date, str]:
    meta_path = item.root / "flair_aerial_metadata.json"
    name = Path(item.image).stem
    if meta_path.is_file():
        entry = _json(meta_path).get(name)
        if entry and "date" in entry:
            try:
                return dt.date.fromisoformat(entry["date"]), "flair_aerial_metadata.json"
            except ValueError as e:
                raise DataError(f"{meta_path}: '{name}' date {entry['date']!r} is not YYYY-MM-DD") from e
    domain = zone.parts[0]
    year = domain.rsplit("_", 1)[-1]
    if not year.isdigit():
        raise DataError(f"{item.root / item.image}: no aerial date and domain folder {domain!r} has no year")
    return dt.date(int(year), 7, 1), f"July 1 of the domain year ({domain})"


def read(item: Item) -> Sample:
    img = item.root / item.image
    zone = Path(*Path(item.image).parts[1:3])  # D{ddd}_{YYYY}/Z{n}_{XX}
    aerial, crs, bounds = geotiff.read(img, bands=5)
    msk = item.root / FOLDERS[item.split].format("labels") / zone / "msk" / img.name.replace("IMG_", "MSK_")
    label = geotiff.read(msk, bands=1)[0][0]
    if label.shape != aerial.shape[1:]:
        raise DataError(f"{msk}: label {label.shape} does not match image {aerial.shape[1:]} of {img.name}")
    centroids_path = item.root / CENTROIDS
    centroid = _json(centroids_path).get(img.name)
    if centroid is None:
        raise DataError(f"{centroids_path}: no centroid for {img.name}")
    x, masks, when, sen_source = _sentinel(item, zone)
    rows = _window(int(centroid[0]), x.shape[2], sen_source)
    cols = _window(int(centroid[1]), x.shape[3], sen_source)
    ref, ref_from = _ref_date(item, zone)
    arrays = {"aerial": aerial[None, :NDSM_BAND], "dem": aerial[None, NDSM_BAND:], "s2": x[:, :, rows, cols]}
    meta = {
        "id": item.sample_id,
        "split": item.split,
        "ref_date": dates.row(ref),
        "ref_date_from": ref_from,
        "crs": crs,
        "bounds": bounds,
        "source": {"aerial": item.image, "labels": str(msk.relative_to(item.root)), "s2": sen_source},
        "s2_window": [rows.start, cols.start, S2_WINDOW],
        "aerial_bands": ["red", "green", "blue", "nir"],
        "dem_from": f"band {NDSM_BAND + 1} (nDSM) of {img.name}",
        "licence": LICENCE,
    }
    return Sample(
        sample_key(item.sample_id),
        arrays,
        {
            "aerial": np.array([dates.row(ref)], np.int16),
            "dem": np.array([dates.row(ref)], np.int16),
            "s2": when,
        },
        {"s2": valid.from_cloud(masks[:, :, rows, cols], 0.0)},
        {"cosia": label},
        meta,
    )
