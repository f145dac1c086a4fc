"""Cluster definitions: valid YAML, Ray's cluster schema, spot GPU workers, commands that load."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
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


def test_cluster_launcher_copies_no_virtualenv_and_installs_nothing_per_node():
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert ".venv" in cfg["rsync_exclude"]
    assert all(local != "." for local in cfg["file_mounts"].values())  # not the whole checkout
    assert not cfg.get("setup_commands")  # the image holds maestro: no `make install` per node
    assert (
        cfg["docker"]["image"]
        == yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]["headGroupSpec"][
            "template"
        ]["spec"]["containers"][0]["image"]
    )
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["docker"]["run_options"])


def test_dockerfile_installs_the_pins_and_keeps_flash_attn_optional():
    text = (CLUSTER / "Dockerfile").read_text()
    assert text.splitlines()[[line.startswith("FROM") for line in text.splitlines()].index(True)].startswith(
        "FROM rayproject/ray:2.60.0"
    )
    assert "constraints.txt" in text and 'if [ "${FLASH_ATTN}" = 1 ]' in text
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
    readme = (CLUSTER / "README.md").read_text()
    assert "docker build -f cluster/Dockerfile" in readme and "docker push" in readme
    assert "kubectl delete rayjob" in readme  # how to resume a finished RayJob


def test_rayjob_presents_rays_token_in_every_pod():
    spec = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())["spec"]
    pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"], spec["submitterPodTemplate"]]
    pods += [g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert (
            env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        )


def test_payload_makes_local_paths_absolute_and_resolves_back(tmp_path, monkeypatch):
    from cluster.launch import payload

    monkeypatch.chdir(tmp_path)
    demo = Path(__file__).resolve().parents[1] / "configs/demo.yaml"
    cfg = config.load(demo, ["run.workers=auto", "run.storage=s3://bucket/runs"])
    raw = payload(cfg)["config"]
    assert raw["data"]["shards"] == str(tmp_path / ".demo/shards/train")
    assert raw["run"]["storage"] == "s3://bucket/runs"
    assert raw["run"]["workers"] == cfg.run.workers  # auto resolved on the driver, not per worker
    assert config.dump(config.from_dict(raw)) == config.dump(cfg).replace(
        ".demo/shards/train", str(tmp_path / ".demo/shards/train")
    )


def test_the_workers_own_error_is_found_under_rays_wrappers():
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from cluster.launch import root_cause
    from maestro.errors import ConfigError

    error = ConfigError("data.inputs", "dem", "modalities stored in the shards")
    wrapped = WorkerGroupError(
        "worker 1 failed",
        {
            0: RuntimeError("gloo: connection reset by peer"),
            1: UserExceptionWithTraceback(error, "Traceback ..."),
        },
    )
    assert root_cause(wrapped) is error
    plain = WorkerGroupError("w", {0: UserExceptionWithTraceback(ValueError("boom"), "Traceback ...")})
    assert isinstance(root_cause(plain), ValueError)


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler during the test, as in a terminal: a shell starts background
    jobs (`cmd &`) with SIGINT ignored, and `_DriverStop` restores the handler it found."""
    import signal

    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, saved)


def test_first_ctrl_c_asks_for_a_checkpoint_and_the_second_stops_the_driver(tmp_path, python_sigint):
    import os
    import signal
    import time

    import pytest

    from cluster.launch import _DriverStop

    said, stop = [], tmp_path / "STOP"
    with pytest.raises(KeyboardInterrupt), _DriverStop(str(stop), said.append):
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 30
        while not said and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the KeyboardInterrupt arrives here
    assert stop.read_text().startswith("stop requested") and said[0].startswith("stopping:")


def test_the_terminal_gets_maestros_lines_and_the_log_everything(tmp_path, capfd):
    import os
    import sys

    from cluster.console import RunLog

    log = RunLog()
    with log:
        log.say("maestro pretrain: run X")
        print("\x1b[33mray noise\x1b[0m")
        print("torch FutureWarning", file=sys.stderr)
        os.write(1, b"a C++ service line\n")
    out, err = capfd.readouterr()
    assert out == "maestro pretrain: run X\n" and err == ""
    where = log.keep(str(tmp_path / "run"))
    text = (tmp_path / "run" / "logs" / "driver.log").read_text()
    assert where == str(tmp_path / "run" / "logs") and not log.dir.exists()
    for line in ("maestro pretrain: run X", "ray noise", "torch FutureWarning", "a C++ service line"):
        assert line in text


def test_rank_zero_lines_are_forwarded_whole():
    import queue
    import sys

    from cluster.console import forward_stdout

    lines: queue.Queue = queue.Queue()
    with forward_stdout(lines, rank=0):
        sys.stdout.write("step 10/20  loss")
        sys.stdout.write(" 0.5\nresumed from X\n")
    with forward_stdout(lines, rank=1):
        print("rank 1 says")
    assert [lines.get_nowait() for _ in range(lines.qsize())] == ["step 10/20  loss 0.5", "resumed from X"]
