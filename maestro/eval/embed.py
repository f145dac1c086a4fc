"""`maestro embed`: per-sample embeddings with their footprints, to GeoParquet, streaming and resumable.

One Parquet file per shard of the split, `OUT/SPLIT-NNNNNN.parquet`, one row group per batch,
written when its shard is done (the split streams through, a shard's rows are held until then);
a rerun skips the shards whose file is complete (its footer reads) and resumes with the next.
Each row is one item (a sample, or one evaluation crop of it):

| column | type | content |
|---|---|---|
| `id` | string | the sample id (`meta.json`'s `id`, else the shard key) |
| `crop` | int32 | the evaluation crop (0 when the crop is the tile) |
| `crs` | string | the sample's CRS (`meta.json`) |
| `bounds` | list<float64>[4] | the crop's footprint `[xmin, ymin, xmax, ymax]` in that CRS |
| `geometry` | binary | the footprint as a WKB polygon (the GeoParquet geometry column) |
| `MOD` | list<float32>[E] | tokens of modality MOD (all band groups and dates) averaged |
| `MOD/gG` | list<float32>[E] | tokens of band group G of MOD averaged (modalities with G > 1) |
| `GROUP` | list<float32>[E] | tokens of fusion group GROUP averaged (groups of several modalities) |
| `tokens/MOD` | list<float32>[n·E] | with `--tokens`: every token, `(G·T·L, E)` row-major |

The file metadata carries the GeoParquet `geo` key (version 1.0.0, WKB encoding, one CRS per
file when all its rows share one, as PROJJSON is not available here: the CRS as its `id` string)
and `maestro` (the config's model and data keys, the weights).
"""

from __future__ import annotations

import json
import struct
import sys
from typing import Any

import numpy as np
import torch

from maestro import storage
from maestro.config import Config
from maestro.data.geometry import Geometry
from maestro.eval.data import Pass, split_url
from maestro.eval.weights import load_init
from maestro.train.loop import run_url, to_device


def wkb_polygon(bounds: list[float]) -> bytes:
    """The WKB (little-endian) of the rectangle `[xmin, ymin, xmax, ymax]`, closed ring, CCW."""
    x0, y0, x1, y1 = bounds
    ring = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    return struct.pack("<BIII", 1, 3, 1, len(ring)) + b"".join(struct.pack("<dd", x, y) for x, y in ring)


def crop_bounds(tile: list[float], geom: Geometry, crop: int) -> list[float]:
    """The footprint of evaluation crop `crop` (`geom.origins[crop]`, row 0 at the top) of a tile."""
    x0, y0, x1, y1 = tile
    (r, c), n = geom.origins[crop], geom.cells
    w, h = (x1 - x0) / n, (y1 - y0) / n
    k = geom.crop_cells
    return [x0 + c * w, y1 - (r + k) * h, x0 + (c + k) * w, y1 - r * h]


def pooled(cfg: Config, tokens: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Column name -> (B, E) mean embeddings per modality, band group and fusion group."""
    out = {}
    for m, x in tokens.items():
        spec = cfg.derived.modalities[m]
        out[m] = x.float().mean(1)
        g = len(spec.groups)
        if g > 1:
            for i, part in enumerate(x.float().chunk(g, 1)):
                out[f"{m}/g{i}"] = part.mean(1)
    for group, mods in cfg.derived.groups.items():
        if len(mods) > 1:
            out[group] = torch.cat([tokens[m].float() for m in mods], 1).mean(1)
    return {k: v.cpu().numpy() for k, v in out.items()}


def _geo_metadata(crs: set[str]) -> dict[str, Any]:
    column: dict[str, Any] = {"encoding": "WKB", "geometry_types": ["Polygon"]}
    if len(crs) == 1:
        column["crs"] = {"id": next(iter(crs))}
    return {"version": "1.0.0", "primary_column": "geometry", "columns": {"geometry": column}}


def _table(rows: dict[str, Any]) -> Any:
    import pyarrow as pa

    arrays = {}
    for k, v in rows.items():
        if isinstance(v, np.ndarray) and v.ndim == 2:
            arrays[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
        elif k == "geometry":
            arrays[k] = pa.array(v, pa.binary())
        else:
            arrays[k] = pa.array(v)
    return pa.table(arrays)


def _complete(url: str) -> bool:
    """Whether a shard's Parquet file was written to its end (its footer reads)."""
    import pyarrow.parquet as pq

    if not storage.exists(url):
        return False
    try:
        with storage.open_file(url) as f:
            pq.read_metadata(f)
    except Exception:  # a truncated or foreign file: write it again
        return False
    return True


def batch_rows(
    cfg: Config, batch: dict[str, Any], enc: dict[str, torch.Tensor], geom: Geometry, tokens: bool
) -> dict:
    """The Parquet columns of one batch (see the module docstring)."""
    metas = batch["_meta"]
    bounds = [
        crop_bounds(m["bounds"], geom, c) if "bounds" in m else [float("nan")] * 4
        for m, c in zip(metas, batch["_crops"])
    ]
    rows: dict[str, Any] = {
        "id": [m.get("id", k) for m, k in zip(metas, batch["_keys"])],
        "crop": np.array(batch["_crops"], np.int32),
        "crs": [str(m.get("crs", "")) for m in metas],
        "bounds": np.array(bounds, np.float64),
        "geometry": [wkb_polygon(b) for b in bounds],
    }
    rows.update(pooled(cfg, enc))
    if tokens:
        rows.update({f"tokens/{m}": x.float().flatten(1).cpu().numpy() for m, x in enc.items()})
    return rows


def embed_split(
    cfg: Config, split: str, out: str, tokens: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Embed every item of a split into `out` (see the module docstring); resumes by shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from maestro.model import build_model
    from shards import manifest as manifest_io

    init = cfg.model.init or run_url(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).eval()
    load_init(model, init)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.run.use_gpu != "false" else "cpu")
    model.to(device)
    url = split_url(cfg, split)
    shards = manifest_io.read(url)["shards"]
    data = Pass(cfg, url)
    crops = len(data.recipe.geom.origins)
    meta = {
        "split": url,
        "init": init,
        "model": cfg.to_dict()["model"],
        "inputs": list(cfg.derived.modalities),
    }
    total, seen, written, resumed = sum(s["samples"] for s in shards) * crops, 0, 0, 0
    for i, shard in enumerate(shards):
        target = storage.join(out, shard["name"].rsplit(".", 1)[0] + ".parquet")
        if _complete(target):
            seen += shard["samples"] * crops
            resumed += 1
            continue
        tables = []
        for batch in data.batches(i):
            with torch.no_grad():
                enc = model.encode(to_device(batch, device))
            tables.append(_table(batch_rows(cfg, batch, enc, data.recipe.geom, tokens)))
            seen += len(batch["_keys"])
            if progress:
                sys.stderr.write(f"\rembedding {url}: {seen}/{total} items")
                sys.stderr.flush()
        if not tables:
            continue
        table = pa.concat_tables(tables)
        crs = {c for c in table.column("crs").to_pylist() if c}
        table = table.replace_schema_metadata(
            {"geo": json.dumps(_geo_metadata(crs)), "maestro": json.dumps(meta)}
        )
        with storage.open_file(target, "wb") as f:
            pq.write_table(table, f, row_group_size=cfg.data.batch_size)
        written += table.num_rows
    if progress:
        sys.stderr.write("\n")
    return {
        "split": url,
        "out": out,
        "items": seen,
        "rows": written,
        "files": len(shards),
        "resumed": resumed,
    }
