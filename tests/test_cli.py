"""The `maestro` command line: fast help (no heavy imports), `maestro config` with sources, overlays."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from maestro import cli
from maestro.cli_config import sources

ROOT = Path(__file__).resolve().parents[1]


def test_help_imports_neither_torch_nor_ray_nor_deepspeed():
    code = (
        "import sys, contextlib, io\n"
        "import maestro.cli as c\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        c.main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'deepspeed', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_bench_commands_still_load_when_asked_for(capsys):
    try:
        cli.main(["bench", "step", "--help"])
    except SystemExit as e:
        assert e.code == 0
    assert "--json" in capsys.readouterr().out


def test_config_lists_every_key_with_its_source():
    table = sources("configs/demo.yaml", ["configs/local.yaml", "train.steps=7"])
    assert table["train.steps"] == {"value": 7, "source": "override"}
    assert table["data.batch_size"] == {"value": 4, "source": "file configs/demo.yaml"}
    assert table["data.modalities.aerial.image_size"]["source"] == "file configs/demo.yaml"
    assert table["run.storage"] == {"value": "runs", "source": "file configs/local.yaml"}
    assert table["run.workers"]["source"] == "file configs/local.yaml"
    assert isinstance(table["run.workers"]["value"], int) and table["run.workers"]["value"] >= 1
    assert table["optim.weight_decay"] == {"value": 0.01, "source": "default"}
    assert table["derived.global_batch"]["source"] == "derived"
    from maestro import config

    defaults = config.Config().to_dict()
    for section, keys in defaults.items():
        if section == "derived":
            continue
        for key in keys:
            if key != "modalities":
                assert f"{section}.{key}" in table, (section, key)


def test_config_json_is_one_object_on_the_last_line(capsys):
    assert cli.main(["config", "configs/demo.yaml", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    table = json.loads(last)
    assert table["run.name"] == {"value": "demo", "source": "file configs/demo.yaml"}


def test_overlay_makes_a_gpu_preset_fit_this_machine():
    from maestro import config, machine

    cfg = config.load("configs/treesatai_ts.yaml", ["configs/local.yaml", "run.use_gpu=false"])
    assert cfg.run.workers == machine.cpus() and cfg.run.storage == "runs" and cfg.run.address == ""
    assert cfg.derived.global_batch == cfg.data.batch_size * machine.cpus()


def test_auto_workers_refused_on_a_cluster():
    import pytest

    from maestro import config
    from maestro.errors import ConfigError

    with pytest.raises(ConfigError, match="run.address"):
        config.load("configs/demo.yaml", ["run.workers=auto", "run.address=auto"])


def test_the_final_line_says_how_many_samples_were_skipped_and_why():
    from cluster.cli import skipped_line

    assert skipped_line({"total": 0, "reasons": {}}) == "no sample skipped"
    line = skipped_line({"total": 3, "reasons": {"digest mismatch": 1, "unreadable": 2}})
    assert line == "3 samples skipped (1 digest mismatch, 2 unreadable)"
