"""The README's own-sensor example, run as written: the YAML, the Python that writes the split, the
folder conversion, then `maestro shards verify`, `maestro pretrain` (a 4-step debug-size run on
one CPU worker, through Ray and DeepSpeed: what it prints is the quiet terminal a user sees) and the
TensorBoard folder it names."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from shards import manifest as manifest_io
from shards import reader

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- example (\S+) -->\n```\w*\n(.*?)```", re.S)


def _examples() -> dict[str, str]:
    return dict(BLOCK.findall((REPO / "README.md").read_text()))


def _run(line: str, cwd: Path) -> str:
    """A README command line, with `maestro`/`python` from this interpreter and this checkout: what
    it printed (stdout, then stderr)."""
    args = shlex.split(line.split("#")[0])
    if args[0] == "maestro":
        args = [sys.executable, "-m", "maestro.cli", *args[1:]]
    elif args[0] == "python":
        args = [sys.executable, *args[1:]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (line, done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout + done.stderr


def _as_folders(split_url: str, root: Path) -> None:
    """The samples of a split in the `folder` converter's layout (what a user's files look like)."""
    for s in reader.iter_split(split_url):
        d = root / "train" / s.meta["id"]
        d.mkdir(parents=True)
        np.save(d / "planet.npy", s.arrays["planet"])
        np.save(d / "planet.valid.npy", s.valid["planet"])
        np.save(d / "crop_type.label.npy", s.targets["crop_type"])
        with open(d / "planet.dates.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["year", "day_of_year", "hour"])
            w.writerows(s.dates["planet"].tolist())
        (d / "meta.json").write_text(json.dumps({k: s.meta[k] for k in ("crs", "bounds")}))


def test_readme_own_sensor_example_runs_as_written(tmp_path):
    ex = _examples()
    assert {"planet.yaml", "write.py", "folder", "commands"} <= set(ex)
    api, folder = tmp_path / "api", tmp_path / "folder"
    for d in (api, folder):
        d.mkdir()
        (d / "planet.yaml").write_text(ex["planet.yaml"])
    (api / "write.py").write_text(ex["write.py"])
    assert _run("python write.py", api).strip() == "16 samples in 1 shards"
    written = manifest_io.read(str(api / "shards/planet/train"))
    assert written["modalities"]["planet"]["bands"] == ["blue", "green", "red", "nir"]

    _as_folders(str(api / "shards/planet/train"), folder / "my_tiles")
    for line in ex["folder"].strip().splitlines():
        _run(line, folder)
    converted = manifest_io.read(str(folder / "shards/planet/train"))
    assert converted["samples"] == 16
    assert converted["statistics"]["modalities"] == written["statistics"]["modalities"]

    lines = ex["commands"].strip().splitlines()
    assert lines[-1].startswith("tensorboard --logdir ")
    for line in lines[:-1]:  # tensorboard is a server: its folder is checked instead
        out = _run(line, api)
    logdir = api / lines[-1].split("--logdir ")[1].strip()
    assert "finished at step 4" in out and str(logdir) in out
    # `maestro pretrain` (its own local Ray, 4 steps on one worker) keeps the terminal quiet: the
    # banner (which says the stage that runs: 0 on one worker), progress and the summary, no colour
    # codes, at most 15 lines; the libraries' output is in RUN/logs.
    printed = out.strip().splitlines()
    assert len(printed) <= 15, out
    assert printed[0] == f"maestro pretrain: run {api / 'runs' / 'planet'}", printed[0]
    assert any("ZeRO 0, fp32" in line for line in printed), printed
    assert [line.split()[1] for line in printed if line.startswith("step ")] == ["2/4", "4/4"]
    assert printed[-1].startswith("finished at step 4")
    assert "\x1b[" not in out
    logs = api / "runs" / "planet" / "logs"
    assert "Started a local Ray instance" in (logs / "driver.log").read_text()
    assert any(p.name.startswith("worker-") for p in (logs / "ray").iterdir())
    assert list(logdir.glob("events.out.tfevents.*"))
    assert json.loads((api / "runs/planet/summary.json").read_text())
