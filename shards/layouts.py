"""The folder layout each converter reads, in one place: shown by `maestro shards convert NAME --help`
and quoted by the error a converter raises when ROOT does not hold that layout.

This module imports nothing heavy, so the CLI can build its help without loading the converters.
"""

from __future__ import annotations

LAYOUTS = {
    "treesatai_ts": """\
TreeSatAI-TS (IGNF/TreeSatAI-Time-Series):
  ROOT/{train,val,test}.csv    split lists, one per split: columns aerial_name, sen_name,
                               aerial_date (YYYYMMDD) and the 15 genus area fractions
  ROOT/aerial/NAME.tif         4-band CIR GeoTIFF of each sample (NAME = aerial_name)
  ROOT/sentinel-ts/NAME.h5     the sample's S1/S2 series (NAME = sen_name): sen-2-data,
                               sen-2-masks, sen-1-asc-data, sen-1-des-data and their *-products
splits: train, val, test (those whose CSV exists)""",
    "pastis": """\
PASTIS, PASTIS-R, PASTIS-HD:
  ROOT/metadata.geojson        one feature per patch: ID_PATCH, Fold (1-5), dates-S2, dates-S1A, dates-S1D
  ROOT/DATA_S2/S2_ID.npy       (T, 10, H, W) int16 Sentinel-2 series
  ROOT/DATA_S1A/S1A_ID.npy     (T, 3, H, W) Sentinel-1 ascending (PASTIS-R; optional)
  ROOT/DATA_S1D/S1D_ID.npy     (T, 3, H, W) Sentinel-1 descending (PASTIS-R; optional)
  ROOT/DATA_SPOT/**/SPOT6_RVB_1M00_2019_ID.tif   SPOT-6 RGB (PASTIS-HD; optional)
  ROOT/ANNOTATIONS/TARGET_ID.npy                 (3, H, W) labels, channel 0 the classes
splits: fold1 ... fold5 (the Fold values of metadata.geojson)""",
    "flair_hub": """\
FLAIR-HUB:
  ROOT/csv/*_{TRAIN,VALID,TEST}.csv   split lists (or at ROOT): patch_id and one path per
                                      modality column (AERIAL_RGBI, DEM_ELEV, SENTINEL2_TS, ...),
                                      relative to the CSV's folder
  ROOT/GLOBAL_ALL_MTD/GLOBAL_{SENSOR}_MTD_DATES.gpkg   acquisition dates per sensor
splits: train, valid, test (those whose CSV exists)""",
    "flair2": """\
FLAIR #2 (original release):
  ROOT/flair_aerial_train/D{ddd}_{YYYY}/Z{n}_{XX}/img/IMG_ID.tif   5 bands R,G,B,NIR,nDSM
  ROOT/flair_labels_train/D{ddd}_{YYYY}/Z{n}_{XX}/msk/MSK_ID.tif   labels
  ROOT/flair_sen_train/D{ddd}_{YYYY}/Z{n}_{XX}/sen/SEN2_*_{data,masks}.npy, SEN2_*_products.txt
  ROOT/flair_2_{aerial,labels,sen}_test/...                        the same tree for the test split
  ROOT/flair-2_centroids_sp_to_patch.json                          {IMG_ID.tif: [row, col]}
  ROOT/flair_aerial_metadata.json                                  aerial dates (optional)
writes: aerial (R,G,B,NIR), dem (the nDSM band), s2 (the tile's window), cosia
splits: train, test (those whose flair_aerial_train / flair_2_aerial_test folder exists)""",
    "folder": """\
A folder per sample (any sensor declared in --config's data.modalities or its preset):
  ROOT/SPLIT/SAMPLE_ID/MOD.npy        (T, C, H, W) series of modality MOD (or MOD.tif: a GeoTIFF
                                      of T*C bands, date-major, C = the modality's raw channels)
  ROOT/SPLIT/SAMPLE_ID/MOD.dates.csv  one row per date, header `year,day_of_year,hour`
                                      (hour optional) or `date,hour` with date YYYY-MM-DD
  ROOT/SPLIT/SAMPLE_ID/MOD.valid.npy  optional (T, H, W) mask, 1 = usable pixel
  ROOT/SPLIT/SAMPLE_ID/NAME.label.npy optional label NAME (class raster or label vector)
  ROOT/SPLIT/SAMPLE_ID/meta.json      optional metadata (crs, bounds, licence, ...)
every modality of the config's data.inputs must be present in every sample folder
splits: the sub-folders of ROOT (e.g. train, val)""",
}
