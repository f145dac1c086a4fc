"""Cluster definitions: valid YAML, Ray's cluster schema, spot GPU workers, commands that load."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from maestro import config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _pretrain_command(text: str) -> list[str]:
    words = shlex.split(text.replace("\\\n", " "))
    return words[words.index("pretrain") + 1 :]


def test_cluster_launcher_yaml_passes_rays_schema_with_spot_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # defaults filled in, then the schema: raises on violations
    workers = cfg["available_node_types"]["gpu_spot"]
    assert workers["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert workers["resources"]["GPU"] >= 1
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]  # the driver stays on on-demand capacity


def test_rayjob_manifest_runs_a_config_that_loads():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    path, *overrides = _pretrain_command(spec["entrypoint"])
    cfg = config.load(Path(__file__).resolve().parents[1] / path, overrides)
    assert cfg.run.address == "auto" and cfg.run.storage.startswith("s3://")
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["template"]["spec"]["nodeSelector"]["karpenter.sh/capacity-type"] == "spot"
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) * group["replicas"] == cfg.run.workers


def test_readme_commands_name_existing_files_and_valid_configs():
    text = (CLUSTER / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.findall(r"maestro pretrain .*?(?:\n(?!\s)|$)", block.replace("\\\n", " "), re.S):
            path, *overrides = _pretrain_command(line.split("#")[0])
            config.load(Path(__file__).resolve().parents[1] / path, overrides)
        for name in re.findall(r"cluster/[\w.-]+", block):
            assert (CLUSTER.parent / name).exists(), name
