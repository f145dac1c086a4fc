"""Checks before any worker starts: shards against the config, resources against the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import resources
from maestro import config
from maestro.errors import ConfigError, DataError, ResourceError
from maestro.train import preflight

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    from shards.synth import write_synthetic

    url = str(tmp_path_factory.mktemp("pre"))
    write_synthetic(url, "treesatai_ts", samples=4, seed=0, max_dates=2, shard_samples=2)
    return f"{url}/train"


def _cfg(shards: str, tmp_path, *extra: str):
    return config.load(
        "configs/demo.yaml",
        [f"data.shards={shards}", f"run.storage={tmp_path}/runs", "run.use_gpu=false", *extra],
    )


def test_a_split_that_fits_passes(split, tmp_path):
    preflight.check(_cfg(split, tmp_path))


def test_missing_and_invalid_manifests_fail_naming_the_file(split, tmp_path):
    with pytest.raises(DataError, match=f"no manifest.json at {tmp_path}/nowhere"):
        preflight.check(_cfg(f"{tmp_path}/nowhere", tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="manifest.json"):
        preflight.check(_cfg(str(bad), tmp_path))


def _copy_with_manifest(split: str, tmp_path, edit) -> str:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(split, out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return str(out)


def test_an_input_the_shards_lack_fails_naming_it(split, tmp_path):
    shards = _copy_with_manifest(split, tmp_path, lambda m: m["modalities"].pop("s1_des"))
    with pytest.raises(ConfigError, match="s1_des.*stored in"):
        preflight.check(_cfg(shards, tmp_path))


def test_rasters_too_small_for_the_crop_fail_with_both_sizes(split, tmp_path):
    with pytest.raises(ConfigError, match=r"data.modalities.s2.resolution_m.*6 px per side.*needs 12 px"):
        preflight.check(_cfg(split, tmp_path, "data.modalities.s2.resolution_m=5.0"))


def test_too_few_samples_for_ranks_and_loader_workers_names_the_fix(split, tmp_path):
    with pytest.raises(ConfigError, match=r"4 samples.*run.workers=2 × data.workers=3 = 6.*data.workers=2"):
        preflight.check(_cfg(split, tmp_path, "run.workers=2", "data.workers=3"))


def _run_cfg(workers: int, gpu: bool):
    return config.load(None, [f"run.workers={workers}", f"run.use_gpu={str(gpu).lower()}"])


def test_eight_gpu_workers_on_a_laptop_say_what_fits():
    text = resources.shortfall(_run_cfg(8, True), [{"CPU": 2.0, "GPU": 0.0}], "this machine")
    assert "run.workers=8 asks for 8 worker(s) of 1 CPU(s) and 1 GPU each" in text
    assert "this machine has 2 CPU(s) and 0 GPU(s)" in text
    assert "What fits: run.workers=2 run.use_gpu=false" in text


def test_two_gpu_workers_on_one_gpu_say_what_is_possible():
    text = resources.shortfall(_run_cfg(2, True), [{"CPU": 16.0, "GPU": 1.0}], "this machine")
    assert "run.workers=1 run.use_gpu=true or run.workers=2 run.use_gpu=false" in text
    assert "NCCL does not share GPUs" in text
    assert resources.shortfall(_run_cfg(1, True), [{"CPU": 16.0, "GPU": 1.0}], "this machine") is None


def test_workers_are_placed_per_node():
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 0.0}]
    assert resources.room(nodes, 4, True) == 2 and resources.room(nodes, 4, False) == 4
    assert resources.shortfall(_run_cfg(3, True), nodes, "the Ray cluster").startswith("run.workers=3")


def test_a_gpu_preset_on_this_machine_fails_in_the_driver_before_ray(split, tmp_path):
    from maestro import machine

    if machine.gpus() >= 8:
        pytest.skip("this machine holds the preset's 8 GPU workers")
    with pytest.raises(ResourceError, match="What fits"):
        resources.check_local(config.load("configs/treesatai_ts.yaml", [f"data.shards={split}"]))
    cmd = [sys.executable, "-m", "maestro.cli", "pretrain", "configs/treesatai_ts.yaml",
           f"data.shards={split}", f"run.storage={tmp_path}/runs", "data.workers=1"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run.workers=8 asks for 8 worker(s)") and "configs/local.yaml" in last
