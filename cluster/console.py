"""A quiet terminal: maestro's own lines on it, everything else in the run's log files.

On the driver, `RunLog` points file descriptors 1 and 2 (so Ray's, DeepSpeed's, torch's and every
library's output, C++ services included) at `driver.log` in a local folder, and `say` writes to
the terminal the process started with. Rank 0's lines (progress, resume, warnings) travel from
its worker to the driver through a Ray queue (`forward_stdout`); the workers' own logs stay in
Ray's log folder. `RunLog.keep(url)` copies the folder into the run folder (`RUN/logs`, local or
s3://) at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, TextIO

from maestro import storage

LOG_DIR = "logs"


class RunLog:
    """Redirect this process's stdout/stderr to `DIR/driver.log`; `say` reaches the terminal."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="maestro-log-"))
        self._saved: dict[int, int] = {}
        self._streams: tuple[TextIO, TextIO] | None = None
        self._terminal: TextIO | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> RunLog:
        sys.stdout.flush()
        sys.stderr.flush()
        self._terminal = os.fdopen(os.dup(1), "w", buffering=1)
        log = os.open(self.dir / "driver.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for fd in (1, 2):
            self._saved[fd] = os.dup(fd)
            os.dup2(log, fd)
        os.close(log)
        # Python's own streams too, wherever they pointed (a test's capture, a wrapper)
        self._streams = sys.stdout, sys.stderr
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
        return self

    def say(self, line: str) -> None:
        """One line on the terminal (also kept in driver.log)."""
        with self._lock:
            if self._terminal is None:
                print(line, flush=True)
                return
            self._terminal.write(line + "\n")
            self._terminal.flush()
            print(line, flush=True)  # into driver.log, beside what the libraries wrote

    def __exit__(self, *exc: Any) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        if self._streams is not None:  # not closed: loggers set up meanwhile keep writing to the log
            sys.stdout, sys.stderr = self._streams
            self._streams = None
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._saved = {}
        if self._terminal is not None:
            self._terminal.close()
            self._terminal = None

    def keep(self, run_url: str) -> str:
        """Copy the log folder to `run_url/logs` and remove the local one; returns where the logs
        are. Where the copy fails (the storage is what failed) they stay in the local folder."""
        target = storage.join(run_url, LOG_DIR)
        try:
            for path in sorted(p for p in self.dir.rglob("*") if p.is_file()):
                storage.write_bytes(storage.join(target, str(path.relative_to(self.dir))), path.read_bytes())
        except Exception:  # never hide the run's own outcome behind a failed copy of its logs
            return str(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        return target


class _Forward:
    """A stdout that also sends each complete line to the driver's queue."""

    def __init__(self, out: TextIO, queue: Any):
        self.out, self.queue, self.pending = out, queue, ""

    def write(self, text: str) -> int:
        self.out.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.queue.put(line)
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.out, name)


class forward_stdout:
    """In a worker: rank 0's stdout lines go to `queue` as well (no-op without a queue or off rank 0).

    The libraries that keep their own handle on stdout (DeepSpeed's logger) were imported first and
    keep writing to the worker's log only.
    """

    def __init__(self, queue: Any, rank: int):
        self.queue = queue if rank == 0 else None
        self._old: TextIO | None = None

    def __enter__(self) -> forward_stdout:
        if self.queue is not None:
            self._old, sys.stdout = sys.stdout, _Forward(sys.stdout, self.queue)  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            sys.stdout.flush()
            sys.stdout = self._old
