"""Run checkpoints `RUN/checkpoint_STEP/` on a local folder or `s3://`, complete only when marked.

A checkpoint holds the DeepSpeed engine state (model, optimizer, schedule; one optimizer
partition per rank under ZeRO), each rank's own files (data stream state, EMA partitions) and the
run files written by rank 0 (resolved config, code version, `state.json`). Every rank writes its
part (never rank 0 alone: ZeRO state is partitioned), all ranks meet at a barrier, and only then
rank 0 writes the `COMPLETE` marker, so a checkpoint cut short by a crash is never loaded. Rank 0
then keeps the newest `keep` complete checkpoints and deletes everything else.

On S3 each rank stages its part in a local temporary folder and uploads it; loading downloads
only the files the rank needs (the shared ones and its own partitions).

A run resumed with another number of workers loads the universal form of the checkpoint,
`checkpoint_STEP/universal/`, which rank 0 converts once (`make_universal`) and marks complete the
same way.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from maestro import storage
from maestro.errors import CheckpointError

MARKER = "COMPLETE"
PREFIX = "checkpoint_"
UNIVERSAL = "universal"  # subfolder of a checkpoint: its universal form, once converted
_OWNED = re.compile(r"(?:zero_pp_rank_|^rank)(\d+)_")  # files that belong to one rank


def tag(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def code_version() -> dict[str, Any]:
    """The package version and, in a git checkout, the commit and whether the tree was modified."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        out: dict[str, Any] = {"package": version("maestro")}
    except PackageNotFoundError:
        out = {"package": None}
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return out
    if commit.returncode == 0:
        out.update(commit=commit.stdout.strip(), modified=bool(dirty.stdout.strip()))
    return out


def encode(obj: Any) -> bytes:
    """Bytes of a tensor/primitive tree, readable back with `torch.load(weights_only=True)`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def decode(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class CheckpointStore:
    """The checkpoints of one run folder `run_url` (local path or `s3://bucket/prefix/run`)."""

    def __init__(self, run_url: str, keep: int):
        self.url = run_url.rstrip("/")
        self.fs, self.root = storage.url_to_fs(self.url)
        self.local = not storage.is_s3(self.url)
        self.keep = keep

    def _dir(self, step: int) -> str:
        return f"{self.root}/{tag(step)}"

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        self.fs.invalidate_cache()
        markers = self.fs.glob(f"{self.root}/{PREFIX}*/{MARKER}")
        steps = []
        for m in markers:
            name = m.rstrip("/").split("/")[-2]
            if re.fullmatch(rf"{PREFIX}\d+", name):
                steps.append(int(name[len(PREFIX) :]))
        return sorted(steps)

    def latest(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def save(
        self,
        step: int,
        engine: Any,
        rank: int,
        files: dict[str, bytes],
        run_files: dict[str, bytes] | None = None,
    ) -> None:
        """Write this rank's part of checkpoint `step` (every rank calls this, in step).

        `files` are this rank's own (name them `rank{R}_*`); `run_files` are written by rank 0
        only. Returns after the marker is written and old checkpoints are pruned.
        """
        from maestro.parallel import dist

        name = tag(step)
        staging = self.root if self.local else tempfile.mkdtemp(prefix=f"maestro-{name}-")
        from maestro.parallel.deepspeed import UNIVERSAL_INFO

        engine.save_checkpoint(staging, tag=name, client_state=UNIVERSAL_INFO, save_latest=False)
        own = dict(files)
        if rank == 0:
            own.update(run_files or {})
        for fname, data in own.items():
            Path(staging, name, fname).write_bytes(data)
        if not self.local:
            self.fs.put(f"{staging}/{name}/", f"{self._dir(step)}/", recursive=True)
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()
        if rank == 0:
            marker = {"step": step, "time": time.time()}
            self.fs.pipe_file(f"{self._dir(step)}/{MARKER}", json.dumps(marker).encode())
            self.prune()

    def prune(self) -> None:
        """Delete every checkpoint folder but the newest `keep` complete ones (half-written ones too)."""
        keep = {tag(s) for s in self.complete_steps()[-self.keep :]}
        for path in self.fs.glob(f"{self.root}/{PREFIX}*"):
            if path.rstrip("/").split("/")[-1] not in keep:
                self.fs.rm(path, recursive=True)

    def read(self, step: int, fname: str) -> bytes:
        try:
            return self.fs.cat_file(f"{self._dir(step)}/{fname}")
        except FileNotFoundError as e:
            raise CheckpointError(
                f"{self.url}/{tag(step)}/{fname} is missing from a checkpoint marked complete; "
                f"delete {self.url}/{tag(step)} to resume from the one before"
            ) from e

    def load(self, step: int, engine: Any, rank: int, universal: bool = False) -> None:
        """Load the engine state of checkpoint `step` on this rank (every rank calls this);
        `universal`: its universal form (`make_universal` first), into an engine built for it."""
        from maestro.parallel.deepspeed import weights_only_loads

        name = tag(step)
        source = f"{self._dir(step)}/{UNIVERSAL}" if universal else self._dir(step)
        if self.local:
            parent, cleanup = source if universal else self.root, None
        else:
            parent = cleanup = tempfile.mkdtemp(prefix=f"maestro-{name}-")
            if universal:
                self.fs.get(f"{source}/{name}/", f"{parent}/{name}/", recursive=True)
            else:
                os.makedirs(f"{parent}/{name}")
                for path in self.fs.ls(source, detail=False):
                    fname = path.rstrip("/").split("/")[-1]
                    owner = _OWNED.search(fname)
                    if fname != UNIVERSAL and (owner is None or int(owner.group(1)) == rank):
                        self.fs.get(path, f"{parent}/{name}/{fname}")
        try:
            with weights_only_loads() if universal else contextlib.nullcontext():
                loaded, _ = engine.load_checkpoint(parent, tag=name, load_module_strict=True)
        finally:
            if cleanup:
                shutil.rmtree(cleanup, ignore_errors=True)
        if loaded is None:
            raise CheckpointError(
                f"DeepSpeed found no engine state in {self.url}/{name}; delete that folder to resume "
                "from the checkpoint before it"
            )

    def make_universal(self, step: int) -> None:
        """Convert checkpoint `step` to its universal form, unless done already (rank 0 only)."""
        from maestro.parallel.deepspeed import to_universal

        name = tag(step)
        target = f"{self._dir(step)}/{UNIVERSAL}"
        if self.fs.exists(f"{target}/{MARKER}"):
            return
        if self.fs.exists(target):  # a conversion cut short
            self.fs.rm(target, recursive=True)
        work = tempfile.mkdtemp(prefix=f"maestro-{name}-universal-")
        try:
            if self.local:
                src = self._dir(step)
            else:
                src = f"{work}/{name}"
                os.makedirs(src)
                for path in self.fs.ls(self._dir(step), detail=False):
                    if path.rstrip("/").split("/")[-1] != UNIVERSAL:
                        self.fs.get(path, f"{src}/")
            out = f"{target}/{name}" if self.local else f"{work}/{UNIVERSAL}/{name}"  # local: in place
            try:
                to_universal(src, out)
            except Exception as e:
                raise CheckpointError(
                    f"{self.url}/{name}: converting it for a different number of workers failed "
                    f"({e.__class__.__name__}: {e}); resume with the workers it was written by"
                ) from e
            if not self.local:
                self.fs.put(f"{out}/", f"{target}/{name}/", recursive=True)
            self.fs.pipe_file(f"{target}/{MARKER}", json.dumps({"step": step, "time": time.time()}).encode())
        finally:
            shutil.rmtree(work, ignore_errors=True)
