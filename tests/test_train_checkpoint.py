"""Checkpoint integrity and write failures through the real loop (DeepSpeed on gloo, one process).

A changed or truncated file is found by its digest before anything loads it, named, and the run
resumes from the newest older checkpoint that verifies; a write that fails (a full disk) names
the path and the bytes, leaves no partial checkpoint, and the rerun resumes from the one before.
"""

from __future__ import annotations

import errno
import os
import tempfile

import pytest

from maestro.errors import CheckpointError
from maestro.train import checkpoint
from maestro.train.loop import train

pytestmark = pytest.mark.usefixtures("clean_group_env")
MODEL = "mp_rank_00_model_states.pt"


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
