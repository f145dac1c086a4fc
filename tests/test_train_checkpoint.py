"""Checkpoint integrity and write failures through the real loop (DeepSpeed on gloo, one process).

A changed or truncated file is found by its digest before anything loads it, named, and the run
resumes from the newest older checkpoint that verifies; a write that fails (a full disk, in the
background writer) names the path and the bytes, leaves no partial checkpoint, and the rerun
resumes from the one before. A checkpoint written in the background holds the state of its step
while training goes on, verifies and resumes bit-exactly like one written in step; a process
killed while its writer writes leaves no marker, and the resume takes the checkpoint before.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from maestro.errors import CheckpointError
from maestro.train import checkpoint
from maestro.train.loop import train

pytestmark = pytest.mark.usefixtures("clean_group_env")
MODEL = "mp_rank_00_model_states.pt"
REPO = Path(__file__).resolve().parents[1]


def _store(tmp_path, name):
    return checkpoint.CheckpointStore(str(tmp_path / name), keep=3)


def test_changed_or_truncated_file_is_named_and_the_older_checkpoint_used(small_run, tmp_path, capsys):
    cfg = small_run("integrity")
    assert train(cfg)["step"] == 4
    store = _store(tmp_path, "integrity")
    assert store.complete_steps() == [2, 4]
    path = tmp_path / "integrity" / checkpoint.tag(4) / MODEL
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])  # 64 flipped bytes
    path.write_bytes(bytes(data))
    capsys.readouterr()
    again = train(cfg)
    out = capsys.readouterr().out
    assert f"{checkpoint.tag(4)}: {MODEL} does not match the sha256 recorded when it was written" in out
    assert (
        f"resuming from {tmp_path}/integrity/{checkpoint.tag(2)}, the newest checkpoint whose files verify"
        in out
    )
    assert again["start_step"] == 2 and again["step"] == 4
    assert store.complete_steps() == [2, 4] and store.verify(4) is None  # written again by the resume

    with open(path, "r+b") as f:  # truncated, as by a crash of the storage while copying
        f.truncate(os.path.getsize(path) // 3)
    capsys.readouterr()
    third = train(cfg)
    out = capsys.readouterr().out
    assert f"{checkpoint.tag(4)}: {MODEL} holds" in out and "(truncated or replaced)" in out
    assert "PytorchStreamReader" not in out and "delete" not in out.lower()
    assert third["start_step"] == 2 and third["step"] == 4


def test_no_checkpoint_that_verifies_stops_with_the_files_named(small_run, tmp_path):
    cfg = small_run("allbad", "train.steps=2")
    train(cfg)
    (tmp_path / "allbad" / checkpoint.tag(2) / "rank0_data.pt").write_bytes(b"not what was written")
    with pytest.raises(
        CheckpointError, match=r"no checkpoint of .*allbad matches its recorded digests .*rank0_data.pt"
    ):
        train(cfg)
    assert (tmp_path / "allbad" / checkpoint.tag(2) / checkpoint.REJECTED).exists()  # kept, not deleted


def test_full_disk_names_path_and_bytes_and_the_rerun_resumes(small_run, tmp_path, monkeypatch):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    real = TorchCheckpointEngine.save

    def full_at_step_4(self, state_dict, path):
        if checkpoint.tag(4) not in str(path):
            return real(self, state_dict, path)
        with open(path, "wb") as f:  # what a full disk leaves: the start of the file
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(TorchCheckpointEngine, "save", full_at_step_4)
    cfg = small_run("full")
    with pytest.raises(CheckpointError) as e:
        train(cfg)
    message = str(e.value)
    assert (
        f"cannot write checkpoint {tmp_path}/full/{checkpoint.tag(4)}: no space left on the device" in message
    )
    assert f"{checkpoint.tag(4)}/{MODEL}" in message and "bytes free there" in message
    assert f"rerun to resume from {tmp_path}/full/{checkpoint.tag(2)}" in message
    assert not (tmp_path / "full" / checkpoint.tag(4)).exists()  # the partial checkpoint is gone
    monkeypatch.setattr(TorchCheckpointEngine, "save", real)  # space again
    rerun = train(cfg)
    assert rerun["start_step"] == 2 and rerun["step"] == 4
    assert _store(tmp_path, "full").complete_steps() == [2, 4]


def test_s3_run_leaves_no_local_temporary_folders(small_run, s3_bucket, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cfg = small_run("s3", f"run.storage=s3://{s3_bucket}/runs", "train.steps=2")
    summary = train(cfg)
    assert summary["step"] == 2
    assert checkpoint.CheckpointStore(f"s3://{s3_bucket}/runs/s3", keep=3).complete_steps() == [2]
    assert sorted(os.listdir(scratch)) == []  # TensorBoard staging and checkpoint staging removed


# --- checkpoints written in the background (train.checkpoint_async, the default) -----------------


def _tree_equal(a, b, where: str) -> None:
    """Two loaded checkpoint states hold the same values: tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), where
        for k in a:
            _tree_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _tree_equal(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        _tree_equal(vars(a), vars(b), where)
    else:
        assert a == b, where


def _assert_same_checkpoint(a: checkpoint.CheckpointStore, b: checkpoint.CheckpointStore, step: int) -> None:
    from maestro.parallel.deepspeed import safe_load

    files = json.loads(a.read(step, checkpoint.DIGESTS))["files"]
    assert sorted(files) == sorted(json.loads(b.read(step, checkpoint.DIGESTS))["files"])
    for name in files:
        if name.endswith(".pt"):
            _tree_equal(
                safe_load(io.BytesIO(a.read(step, name)), "cpu"),
                safe_load(io.BytesIO(b.read(step, name)), "cpu"),
                name,
            )
        elif name not in ("config.yaml",):  # holds the run's name
            assert a.read(step, name) == b.read(step, name), name


def test_a_background_checkpoint_verifies_and_resumes_bit_exactly_like_a_synchronous_one(
    small_run, tmp_path, monkeypatch
):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    assert train(small_run("sync", "train.checkpoint_async=false"))["step"] == 4
    # The background write of checkpoint 2 is held until step 3 has trained: what it writes must
    # still be step 2's state.
    stepped, real, seen = threading.Event(), TorchCheckpointEngine.save, {}

    def held(self, state_dict, path):
        if checkpoint.tag(2) in str(path):
            assert stepped.wait(120)
        return real(self, state_dict, path)

    def at_step(step, engine, batches):
        if step == 3:
            seen["complete while step 3 trained"] = _store(tmp_path, "async").complete_steps()
            stepped.set()

    monkeypatch.setattr(TorchCheckpointEngine, "save", held)
    assert train(small_run("async"), at_step)["step"] == 4
    assert seen == {"complete while step 3 trained": []}  # written in the background
    sync, background = _store(tmp_path, "sync"), _store(tmp_path, "async")
    assert background.complete_steps() == [2, 4]
    for step in (2, 4):
        assert background.verify(step) is None
        _assert_same_checkpoint(sync, background, step)
    # Resumed from the background checkpoint 2, the run writes the synchronous run's checkpoint 4.
    shutil.rmtree(tmp_path / "async" / checkpoint.tag(4))
    resumed = train(small_run("async"))
    assert resumed["start_step"] == 2 and resumed["step"] == 4
    _assert_same_checkpoint(sync, background, 4)


KILLED_WRITER = """
import json, os, sys, time
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from maestro import config
from maestro.train import checkpoint
from maestro.train.loop import train

real = TorchCheckpointEngine.save

def stuck(self, state_dict, path):
    if checkpoint.tag(4) in str(path):
        with open(path, "wb") as f:  # a file half written, then the process is killed
            f.write(os.urandom(4096))
        open(sys.argv[2], "w").close()
        time.sleep(600)
    return real(self, state_dict, path)

TorchCheckpointEngine.save = stuck
train(config.from_dict(json.loads(sys.argv[1])))
"""


def test_a_kill_while_the_writer_writes_leaves_no_complete_checkpoint_and_the_resume_takes_the_one_before(
    small_run, tmp_path
):
    cfg = small_run("killed")
    mid_write = tmp_path / "mid-write"
    raw = {k: v for k, v in cfg.to_dict().items() if k != "derived"}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_WRITER, json.dumps(raw), str(mid_write)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 240
        while not mid_write.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the writer never reached checkpoint 4"
            time.sleep(0.2)
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
    folder = tmp_path / "killed" / checkpoint.tag(4)
    assert folder.is_dir() and not (folder / checkpoint.MARKER).exists()
    assert not (folder / checkpoint.DIGESTS).exists()
    store = _store(tmp_path, "killed")
    assert store.complete_steps() == [2]
    resumed = train(cfg)
    assert resumed["start_step"] == 2 and resumed["step"] == 4
    assert store.complete_steps() == [2, 4] and store.verify(4) is None
