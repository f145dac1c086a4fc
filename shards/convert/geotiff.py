"""Reading GeoTIFFs with tifffile: pixels as (C, H, W) in the file's dtype, CRS and bounds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from einops import rearrange

from maestro.errors import DataError

_USER_DEFINED = 32767


class _NoGdalNodata(logging.Filter):
    """Drops tifffile's "parsing GDAL_NODATA tag raised" warnings.

    They say the file's nodata value (often -9999) cannot occur in its dtype (uint8, uint16), so
    no pixel carries it; printed once per file and process, they only broke the progress bar.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "GDAL_NODATA" not in record.getMessage()


logging.getLogger("tifffile").addFilter(_NoGdalNodata())


def _crs(geo: dict[str, Any]) -> str | None:
    """An EPSG code where the keys give one; UTM zones on GRS80/WGS84 map to ETRS89/WGS84 UTM codes."""
    for key in ("ProjectedCSTypeGeoKey", "GeographicTypeGeoKey"):
        code = geo.get(key)
        if code is not None and int(code) != _USER_DEFINED:
            return f"EPSG:{int(code)}"
    proj, ellipsoid = geo.get("ProjectionGeoKey"), geo.get("GeogEllipsoidGeoKey")
    if proj is not None and 16001 <= int(proj) <= 16060:  # UTM zone N north
        zone = int(proj) - 16000
        return {7019: f"EPSG:258{zone:02d}", 7030: f"EPSG:326{zone:02d}"}.get(int(ellipsoid or 0))
    return geo.get("GTCitationGeoKey") or None


def read(path: Path, bands: int | None = None) -> tuple[np.ndarray, str | None, list[float] | None]:
    """(C, H, W) pixels, CRS and bounds [xmin, ymin, xmax, ymax] of a GeoTIFF.

    `bands` checks the band count. DataError names the file on a missing or unreadable file.
    """
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            x = series.asarray()
            axes = series.axes
            geo = tif.geotiff_metadata or {}
    except Exception as e:
        raise DataError(f"{path}: unreadable GeoTIFF ({e.__class__.__name__}: {e})") from e
    if axes == "YX":
        x = x[None]
    elif axes in ("YXS", "YXC"):
        x = rearrange(x, "h w c -> c h w")
    elif axes not in ("SYX", "CYX", "QYX", "IYX"):
        raise DataError(f"{path}: unexpected axes {axes!r}; expected a (bands, rows, cols) raster")
    if bands is not None and x.shape[0] != bands:
        raise DataError(f"{path}: {x.shape[0]} bands; expected {bands}")
    bounds = None
    scale, tie = geo.get("ModelPixelScale"), geo.get("ModelTiepoint")
    if scale and tie:
        x0, y1 = tie[3] - tie[0] * scale[0], tie[4] + tie[1] * scale[1]
        bounds = [float(x0), float(y1 - x.shape[1] * scale[1]), float(x0 + x.shape[2] * scale[0]), float(y1)]
    return x, _crs(geo), bounds


def write(path: Path, x: np.ndarray, crs_epsg: int, origin: tuple[float, float], pixel: float) -> None:
    """Write (C, H, W) pixels as a pixel-interleaved GeoTIFF in a projected EPSG CRS (test archives)."""
    keys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, crs_epsg]
    path.parent.mkdir(parents=True, exist_ok=True)
    single = x.shape[0] == 1
    tifffile.imwrite(
        path,
        x[0] if single else rearrange(x, "c h w -> h w c"),
        photometric="minisblack",
        planarconfig=None if single else "contig",
        extratags=[
            (33550, "d", 3, (pixel, pixel, 0.0)),
            (33922, "d", 6, (0.0, 0.0, 0.0, origin[0], origin[1], 0.0)),
            (34735, "H", len(keys), keys),
        ],
    )
