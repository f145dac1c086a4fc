"""Run checkpoints `RUN/checkpoint_STEP/` on a local folder or `s3://`, complete only when marked.

A checkpoint holds the DeepSpeed engine state (model, optimizer, schedule; one optimizer
partition per rank under ZeRO), each rank's own files (data stream state, EMA partitions) and the
run files written by rank 0 (resolved config, code version, `state.json`). Every rank writes its
part (never rank 0 alone: ZeRO state is partitioned), all ranks meet at a barrier, and only then
rank 0 writes `DIGESTS.json` (the sha256 and size of every file, each rank hashing what it wrote) and
then the `COMPLETE` marker, so a checkpoint cut short by a crash is never loaded. Rank 0 then keeps
the newest `keep` complete checkpoints and deletes everything else.

`verify` checks a checkpoint's files against its digests before a resume; one that fails is
marked `REJECTED` (its marker removed, its files left for inspection, never pruned) so that the
resume uses the newest older one that verifies (`maestro.train.resume`). A write that fails (a
full disk, a lost bucket) removes the partial checkpoint and says which path failed and how many
bytes the checkpoint needed, so that a rerun resumes from the one before once there is room.

In the background (`BackgroundWriter`, `train.checkpoint_async`): `save` has DeepSpeed hand every
state it would write to `HostCapture`, which keeps a copy in host memory, and returns; each rank's
writer thread writes the copy and the rank's files, then the ranks' writers meet (a gloo group of
their own) and rank 0's writes the digests and the marker, last. One write is in flight at a time:
the next `save` waits for it, and a failure is raised there (or by `BackgroundWriter.wait` at the
end of the run) on every rank. A process killed mid-write leaves no marker.

On S3 each rank stages its part in a local temporary folder and uploads it; loading downloads
only the files the rank needs (the shared ones and its own partitions).

A run resumed with another number of workers loads the universal form of the checkpoint,
`checkpoint_STEP/universal/`, which rank 0 converts once (`make_universal`) and marks complete the
same way.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from maestro import storage
from maestro.errors import CheckpointError

MARKER = "COMPLETE"
DIGESTS = "DIGESTS.json"  # {"format", "version", "files": {name: {"sha256", "bytes"}}}, before MARKER
REJECTED = "REJECTED.json"  # a checkpoint that failed `verify`: why, and when
PREFIX = "checkpoint_"
UNIVERSAL = "universal"  # subfolder of a checkpoint: its universal form, once converted
_OWNED = re.compile(r"(?:zero_pp_rank_|^rank)(\d+)_")  # files that belong to one rank


def tag(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def owner(fname: str) -> int:
    """The rank that writes file `fname` of a checkpoint (rank 0 for the shared ones)."""
    found = _OWNED.search(fname)
    return 0 if found is None else int(found.group(1))


def _digests(folder: Path, rank: int) -> dict[str, dict[str, Any]]:
    """`{name: {"sha256", "bytes"}}` of the files of a checkpoint folder that `rank` wrote."""
    out = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and owner(path.name) == rank:
            with open(path, "rb") as f:
                digest, size = file_digest(f)
            out[path.name] = {"sha256": digest, "bytes": size}
    return out


def file_digest(f: Any) -> tuple[str, int]:
    """(sha256 hex, bytes) of an open binary file, read in 8 MiB blocks."""
    h, n = hashlib.sha256(), 0
    while block := f.read(8 << 20):
        h.update(block)
        n += len(block)
    return h.hexdigest(), n


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


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


def host_copy(obj: Any) -> Any:
    """A copy of a state tree whose tensors are copies in host memory (what training changes
    next cannot reach it): dicts (their kind kept), lists and tuples are copied through, other
    objects deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = host_copy(v)
        return out
    if isinstance(obj, list):
        return [host_copy(v) for v in obj]
    if isinstance(obj, torch.Size):
        return obj
    if isinstance(obj, tuple):
        items = [host_copy(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if obj is None or isinstance(obj, str | bytes | int | float | bool | torch.dtype | torch.device):
        return obj
    return copy.deepcopy(obj)


def _engine_bytes(engine: Any) -> int:
    return tensor_bytes(engine.module.state_dict()) + tensor_bytes(getattr(engine.optimizer, "state", {}))


def _own_bytes(own: dict[str, Any]) -> int:
    return sum(len(v) if isinstance(v, bytes) else tensor_bytes(v) for v in own.values())


class HostCapture:
    """A DeepSpeed checkpoint engine that writes nothing: each state `engine.save_checkpoint`
    would write is kept as a host copy (`files`: (path, state)), for `target` (the engine's own
    checkpoint engine) to write later. Folders are made at once (DeepSpeed copies its recovery
    script into them)."""

    name = "maestro-host-capture"

    def __init__(self, target: Any):
        self.target = target
        self.files: list[tuple[str, Any]] = []

    def __getattr__(self, attr: str) -> Any:  # anything else DeepSpeed asks: its engine's answer
        return getattr(self.__dict__["target"], attr)

    def create(self, info: Any) -> None:
        pass

    def save(self, state_dict: Any, path: str) -> None:
        self.files.append((path, host_copy(state_dict)))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def load(self, path: str, map_location: Any = None) -> Any:
        raise NotImplementedError("HostCapture only saves")

    def commit(self, info: Any) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return self.target.is_data_parallel_writer(dp_rank)

    def is_decoupled(self) -> bool:
        return False

    def preserves_storage_sharing(self) -> bool:
        return False  # every tensor is copied on its own already


class BackgroundWriter:
    """Writes checkpoints on a thread while training goes on, at most one at a time.

    `submit` waits for the write before (as does `wait`), then starts the next; a write that
    failed is raised by the next `submit` or `wait` as `CheckpointError`, on every rank alike
    (the ranks' writers agree on it over `group`, a gloo group of their own made by every rank
    at once, so that their collectives never meet those of training). `write_s`: the seconds the
    last write took.
    """

    def __init__(self) -> None:
        self.group = torch.distributed.new_group(backend="gloo")
        self._thread: threading.Thread | None = None
        self._failure: str | None = None
        self.step: int | None = None
        self.write_s = 0.0

    def submit(self, step: int, write: Any) -> None:
        self.wait()
        self.step, self._failure = step, None

        def run() -> None:
            t = time.perf_counter()
            try:
                write()
            except CheckpointError as e:
                self._failure = str(e)
            except Exception as e:  # reported by the next submit/wait, never lost with the thread
                self._failure = f"writing checkpoint step {step} failed: {e.__class__.__name__}: {e}"
            self.write_s = time.perf_counter() - t

        self._thread = threading.Thread(target=run, name=f"maestro-checkpoint-{step}", daemon=True)
        self._thread.start()

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Return once no write is in flight; raise `CheckpointError` if the last one failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        failure, self._failure = self._failure, None
        if failure is not None:
            raise CheckpointError(failure)


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
        files: dict[str, Any],
        run_files: dict[str, Any] | None = None,
        writer: BackgroundWriter | None = None,
    ) -> None:
        """Write this rank's part of checkpoint `step` (every rank calls this, in step).

        `files` are this rank's own (name them `rank{R}_*`), `run_files` are written by rank 0
        only: bytes, or a tensor tree written with `encode`. Without `writer`, returns after the
        digests and the marker are written and old checkpoints pruned; raises `CheckpointError`
        on every rank when any rank's write failed (the partial checkpoint is removed first).

        With `writer` (`BackgroundWriter`), waits for the write before (raising its failure on
        every rank), copies the engine state to host memory and returns: the writer writes the
        files, and the digests and the marker last.
        """
        from maestro.parallel import dist
        from maestro.parallel.deepspeed import UNIVERSAL_INFO

        if writer is not None:
            writer.wait()
        name = tag(step)
        if rank == 0 and self.fs.exists(self._dir(step)):
            # One left by a line of training abandoned since (rejected, or cut short): replaced.
            self.fs.rm(self._dir(step), recursive=True)
        dist.barrier()
        staging = self.root if self.local else tempfile.mkdtemp(prefix=f"maestro-{name}-")
        own = dict(files)
        if rank == 0:
            own.update(run_files or {})
        if writer is None:
            digests, failure = self._write_part(
                step,
                rank,
                staging,
                own,
                lambda: engine.save_checkpoint(
                    staging, tag=name, client_state=UNIVERSAL_INFO, save_latest=False
                ),
                _engine_bytes(engine),
            )
            self._finish(step, rank, (digests, failure), _engine_bytes(engine) + _own_bytes(own), None)
            return
        capture = HostCapture(engine.checkpoint_engine)
        engine.checkpoint_engine = capture
        try:
            engine.save_checkpoint(staging, tag=name, client_state=UNIVERSAL_INFO, save_latest=False)
        finally:
            engine.checkpoint_engine = capture.target
        host = {k: v if isinstance(v, bytes) else host_copy(v) for k, v in own.items()}
        writer.submit(step, lambda: self._background(step, rank, staging, host, capture, writer.group))

    def _write_part(
        self,
        step: int,
        rank: int,
        staging: str,
        own: dict[str, Any],
        engine_files: Any,
        engine_bytes: int,
        background: bool = False,
    ) -> tuple[dict[str, dict[str, Any]], str | None]:
        """Write this rank's files of checkpoint `step` (the engine's through `engine_files()`)
        and, on S3, upload them: (their digests, None), or ({}, what failed)."""
        name = tag(step)
        try:
            engine_files()
            for fname, data in own.items():
                Path(staging, name, fname).write_bytes(data if isinstance(data, bytes) else encode(data))
            digests = _digests(Path(staging, name), rank)
            if not self.local:
                self.fs.put(f"{staging}/{name}/", f"{self._dir(step)}/", recursive=True)
            return digests, None
        except OSError as e:
            return {}, self._write_failure(e, step, engine_bytes + _own_bytes(own))
        except Exception as e:
            if not background:
                raise
            # In the writer: said, never raised past the collective that the other ranks wait in.
            return {}, f"cannot write checkpoint {self.url}/{name}: {e.__class__.__name__}: {e}"
        finally:
            if not self.local:
                shutil.rmtree(staging, ignore_errors=True)

    def _finish(self, step: int, rank: int, mine: tuple[dict, str | None], need: int, group: Any) -> None:
        """Every rank's digests and failures to rank 0, which writes `DIGESTS.json` and then the
        marker and prunes; raises `CheckpointError` on every rank when a write failed (on `group`:
        the writer's own process group, so that its collectives never meet training's)."""
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, mine, group=group)
        failures = [f for _, f in parts if f is not None]
        if not failures and rank == 0:
            listing = {k: v for part, _ in parts for k, v in part.items()}
            record = {
                "format": "maestro-checkpoint-digests",
                "version": 1,
                "files": dict(sorted(listing.items())),
            }
            marker = {"step": step, "time": time.time()}
            try:
                self.fs.pipe_file(f"{self._dir(step)}/{DIGESTS}", json.dumps(record, indent=1).encode())
                self.fs.pipe_file(f"{self._dir(step)}/{MARKER}", json.dumps(marker).encode())
            except OSError as e:
                failures = [self._write_failure(e, step, need)]
        if group is not None:  # rank 0's marker, known to every rank's writer
            verdict = [failures[0] if failures else None]
            torch.distributed.broadcast_object_list(verdict, src=0, group=group)
            failures = [verdict[0]] if verdict[0] else []
        if failures:
            if rank == 0 and self.fs.exists(self._dir(step)):
                self.fs.rm(self._dir(step), recursive=True)
            raise CheckpointError(failures[0])
        if rank == 0:
            self.prune()

    def _background(
        self, step: int, rank: int, staging: str, host: dict[str, Any], capture: HostCapture, group: Any
    ) -> None:
        """The writer's part of `save`: the host copy to files, then `_finish`."""

        def engine_files() -> None:
            for path, state in capture.files:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                capture.target.save(state, path)

        engine_bytes = tensor_bytes([state for _, state in capture.files])
        mine = self._write_part(step, rank, staging, host, engine_files, engine_bytes, background=True)
        self._finish(step, rank, mine, engine_bytes + _own_bytes(host), group)

    def _write_failure(self, e: OSError, step: int, need: int) -> str:
        """The one-line account of a failed checkpoint write: the path, the bytes, what to do."""
        where = e.filename or f"{self.url}/{tag(step)}"
        room = ""
        if self.local:
            with contextlib.suppress(OSError):
                room = f", {shutil.disk_usage(self.root).free} bytes free there"
        reason = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        previous = self.latest()
        then = "from its start" if previous is None else f"from {self.url}/{tag(previous)}"
        return (
            f"cannot write checkpoint {self.url}/{tag(step)}: {reason} writing {where} (this rank's part is "
            f"about {need} bytes{room}); the partial checkpoint is removed: free space (or set run.storage) "
            f"and rerun to resume {then}"
        )

    def prune(self) -> None:
        """Delete every checkpoint folder but the newest `keep` complete ones and the rejected ones
        (half-written ones go too)."""
        keep = {tag(s) for s in self.complete_steps()[-self.keep :]}
        for path in self.fs.glob(f"{self.root}/{PREFIX}*"):
            if path.rstrip("/").split("/")[-1] not in keep and not self.fs.exists(f"{path}/{REJECTED}"):
                self.fs.rm(path, recursive=True)

    def verify(self, step: int) -> str | None:
        """Check every file of checkpoint `step` against its digests: None when all match, else
        which file failed and how. A checkpoint from before digests were recorded passes."""
        try:
            record = json.loads(self.fs.cat_file(f"{self._dir(step)}/{DIGESTS}"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            return f"its {DIGESTS} is unreadable ({e.__class__.__name__}: {e})"
        for fname, want in record["files"].items():
            try:
                with self.fs.open(f"{self._dir(step)}/{fname}", "rb") as f:
                    digest, size = file_digest(f)
            except FileNotFoundError:
                return f"{fname} is missing"
            except OSError as e:
                return f"{fname} is unreadable ({e.__class__.__name__}: {e})"
            if size != want["bytes"]:
                return (
                    f"{fname} holds {size} bytes where {want['bytes']} were written (truncated or replaced)"
                )
            if digest != want["sha256"]:
                return f"{fname} does not match the sha256 recorded when it was written (changed or corrupted since)"
        return None

    def reject(self, step: int, problem: str) -> None:
        """Take checkpoint `step` out of the complete ones, keeping its files and the reason."""
        note = {"step": step, "problem": problem, "time": time.time()}
        self.fs.pipe_file(f"{self._dir(step)}/{REJECTED}", json.dumps(note).encode())
        self.fs.rm(f"{self._dir(step)}/{MARKER}")

    def remove_partial(self) -> None:
        """Delete checkpoint folders that were never completed (a crash or a failed write cut them
        short): they hold space and are never loaded."""
        self.fs.invalidate_cache()
        for path in self.fs.glob(f"{self.root}/{PREFIX}*"):
            if not (self.fs.exists(f"{path}/{MARKER}") or self.fs.exists(f"{path}/{REJECTED}")):
                self.fs.rm(path, recursive=True)

    def read(self, step: int, fname: str) -> bytes:
        try:
            return self.fs.cat_file(f"{self._dir(step)}/{fname}")
        except FileNotFoundError as e:
            raise CheckpointError(
                f"{self.url}/{tag(step)}/{fname} is missing from a checkpoint marked complete"
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
                    found = _OWNED.search(fname)  # shared files have no rank in their name
                    if fname != UNIVERSAL and (found is None or int(found.group(1)) == rank):
                        self.fs.get(path, f"{parent}/{name}/{fname}")
        try:
            with weights_only_loads() if universal else contextlib.nullcontext():
                loaded, _ = engine.load_checkpoint(parent, tag=name, load_module_strict=True)
        finally:
            if cleanup:
                shutil.rmtree(cleanup, ignore_errors=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no engine state in {self.url}/{name}")

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
