"""`maestro shards convert`: a wrong root fails naming the layout it expected, having written
nothing; each converter's --help shows its layout; the log stays quiet (no GDAL_NODATA warnings,
no ANSI codes when stderr is not a terminal)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from maestro.cli import main
from maestro.modalities import TREESAT_GENERA
from shards.convert import geotiff
from shards.layouts import LAYOUTS

REPO = Path(__file__).resolve().parents[1]


def _make(root: Path, files: list[str]) -> Path:
    for f in files:
        p = root / f
        if f.endswith("/"):
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("")
    return root


# (dataset, what the root holds, a phrase the error must contain)
WRONG = [
    ("treesatai_ts", ["aerial/", "sentinel-ts/"], "no split list"),
    ("treesatai_ts", ["train.csv"], "split 'train' needs ['aerial', 'sentinel-ts']"),
    ("pastis", ["DATA_S2/", "ANNOTATIONS/"], "metadata.geojson: missing"),
    ("flair_hub", ["GLOBAL_ALL_MTD/"], "no split list"),
    ("flair2", ["flair-2_centroids_sp_to_patch.json", "flair_sen_train/"], "no split list"),
    ("flair2", ["flair_aerial_train/"], "needs ['flair_labels_train', 'flair_sen_train'"),
    ("folder", ["notes.txt"], "no split list"),
]


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
@pytest.mark.parametrize("root_kind", ["missing", "empty"])
def test_missing_or_empty_root_fails_naming_the_layout(dataset, root_kind, tmp_path, capsys):
    root = tmp_path / "archive"
    if root_kind == "empty":
        root.mkdir()
    out = tmp_path / "out"
    extra = ["--config", str(REPO / "configs" / "demo.yaml")] if dataset == "folder" else []
    assert main(["shards", "convert", dataset, str(root), str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert str(root) in err and f"this is not a {dataset} archive" in err
    assert LAYOUTS[dataset] in err  # the whole layout: the files and folders looked for
    assert not out.exists()


@pytest.mark.parametrize(("dataset", "files", "phrase"), WRONG)
def test_root_without_its_split_lists_or_folders_fails_first(dataset, files, phrase, tmp_path, capsys):
    root = _make(tmp_path / "archive", files)
    out = tmp_path / "out"
    extra = ["--config", str(REPO / "configs" / "demo.yaml")] if dataset == "folder" else []
    assert main(["shards", "convert", dataset, str(root), str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert phrase in err and LAYOUTS[dataset].splitlines()[1] in err
    assert not out.exists()


def test_a_split_list_without_samples_fails(tmp_path, capsys):
    root = _make(tmp_path / "archive", ["aerial/", "sentinel-ts/"])
    (root / "train.csv").write_text("aerial_name,sen_name,aerial_date\n")
    assert main(["shards", "convert", "treesatai_ts", str(root), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "label columns" in err  # the header is checked before anything is written
    header = "aerial_name,sen_name,aerial_date," + ",".join(TREESAT_GENERA)
    (root / "train.csv").write_text(header + "\n")
    assert main(["shards", "convert", "treesatai_ts", str(root), str(tmp_path / "o")]) == 2
    assert "split 'train' lists no sample" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
def test_each_converter_help_shows_its_layout_and_splits(dataset, capsys):
    with pytest.raises(SystemExit) as e:
        main(["shards", "convert", dataset, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for line in LAYOUTS[dataset].splitlines()[1:]:
        assert line in text
    assert "splits:" in text


def test_gdal_nodata_warnings_do_not_reach_the_terminal(tmp_path, caplog):
    path = tmp_path / "nodata.tif"
    x = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    tifffile.imwrite(path, x, photometric="minisblack", planarconfig="separate",
                     extratags=[(42113, "s", 0, "-9999", False)])  # fmt: skip  # uncastable to uint8
    caplog.set_level(logging.WARNING, logger="tifffile")
    got, _, _ = geotiff.read(path, bands=2)
    np.testing.assert_array_equal(got, x)
    assert not [r for r in caplog.records if "GDAL_NODATA" in r.getMessage()]
    logging.getLogger("tifffile").warning("another tifffile warning")  # others still get through
    assert [r.getMessage() for r in caplog.records] == ["another tifffile warning"]


def test_no_progress_bar_codes_when_stderr_is_not_a_terminal(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "maestro.cli", "shards", "synth", str(tmp_path), "--samples", "3",
           "--max-dates", "3"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True)
    assert "\x1b[" not in run.stderr + run.stdout and "\r" not in run.stderr + run.stdout
    assert run.stderr == "" and "3 samples" in run.stdout


def test_ray_address_comes_from_the_flag_then_the_config(tmp_path):
    from maestro.cli import build_parser
    from shards.cli import _ray

    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  address: ray://head:10001\n")
    base = ["shards", "convert", "folder", "ROOT", "OUT", "--config", str(cfg)]
    parse = build_parser().parse_args
    assert _ray(parse(base)) is None  # no --ray: this process
    assert _ray(parse([*base, "--ray"])) == "ray://head:10001"
    assert _ray(parse([*base, "--address", "auto"])) == "auto"
    assert _ray(parse(["shards", "synth", "OUT", "--ray"])) == ""  # a local Ray
