"""Date parsing for source archives: product names, YYYYMMDD values and date dictionaries.

Every date becomes an int16 row `(year, day_of_year, hour)`; errors name the file and the value.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np

from maestro.errors import DataError


def row(d: dt.date, hour: int = 0) -> list[int]:
    return [d.year, d.timetuple().tm_yday, hour]


def parse_yyyymmdd(value: object, where: str, *, day00: bool = False) -> dt.date:
    """A date written YYYYMMDD (int or str); `day00` maps day 00 to 01 (FLAIR-HUB aerial dates)."""
    text = str(value).strip()
    if day00 and len(text) == 8 and text.endswith("00"):
        text = text[:6] + "01"
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError as e:
        raise DataError(f"{where}: date {value!r} is not YYYYMMDD ({e})") from e


def from_products(products: list[str], where: str) -> np.ndarray:
    """(T, 3) dates from Sentinel product names: the sensing datetime is field -5 of the '_' split,
    `YYYYMMDDTHHMMSS` (S1 GRD and S2 L2A names alike); the hour is kept."""
    out = np.zeros((len(products), 3), np.int16)
    for i, name in enumerate(products):
        fields = name.split("_")
        stamp = fields[-5] if len(fields) >= 5 else ""
        try:
            t = dt.datetime.strptime(stamp[:15], "%Y%m%dT%H%M%S")
        except ValueError as e:
            raise DataError(
                f"{where}: product {i} {name!r} has no YYYYMMDDTHHMMSS sensing time in field -5"
            ) from e
        out[i] = row(t.date(), t.hour)
    return out


def from_dict(mapping: dict | str, where: str, *, first_key: int, day00: bool = False) -> np.ndarray:
    """(T, 3) dates from a dict `{"0": YYYYMMDD, ...}` (or its JSON text), in key order from `first_key`."""
    if isinstance(mapping, str):
        try:
            mapping = json.loads(mapping)
        except ValueError as e:
            raise DataError(f"{where}: date dictionary is not valid JSON ({e})") from e
    if not isinstance(mapping, dict):
        raise DataError(f"{where}: dates are {type(mapping).__name__}; expected a dict {{index: YYYYMMDD}}")
    keys = sorted(mapping, key=lambda k: int(k))
    if [int(k) for k in keys] != list(range(first_key, first_key + len(keys))):
        raise DataError(f"{where}: date keys {keys[:5]}... are not consecutive from {first_key}")
    return np.array([row(parse_yyyymmdd(mapping[k], where, day00=day00)) for k in keys], np.int16).reshape(
        -1, 3
    )
