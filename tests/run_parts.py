"""`make test`: the suite in two pytest processes side by side, one per core of CI's 2-core machine.

The first part holds the two files whose Ray clusters and worker groups take most of the suite's
time (the 4-node elastic runs, the Ray Train runs); the second, every other file. Each part is a
whole pytest run, its files in pytest's order, so a module's shared Ray or trained run is set up
once. A part's report is printed, whole, when it ends; the exit status is the first failing
part's. `TEST_PARTS=1` runs the suite in one process. Arguments go to every part's pytest.

usage: python tests/run_parts.py [pytest args]
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
FIRST = ["test_elastic_ray.py", "test_train_ray.py"]


def parts() -> list[tuple[str, list[str]]]:
    """(name, pytest arguments) of each part: FIRST's files, then every other file."""
    missing = [f for f in FIRST if not (TESTS / f).is_file()]
    if missing:
        raise SystemExit(f"tests/run_parts.py: {missing} not in {TESTS}; update FIRST")
    first = [str(TESTS / f) for f in FIRST]
    return [(" ".join(FIRST), first), ("the rest", [str(TESTS), *(f"--ignore={f}" for f in first)])]


def main(args: list[str]) -> int:
    if os.environ.get("TEST_PARTS") == "1":
        return subprocess.call([sys.executable, "-m", "pytest", "-q", str(TESTS), *args])
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="maestro-tests-") as logs, contextlib.ExitStack() as stack:
        running = []
        for i, (name, files) in enumerate(parts()):
            log = stack.enter_context(open(Path(logs) / f"part{i + 1}.log", "w+"))
            proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", *files, *args], stdout=log, stderr=subprocess.STDOUT
            )
            running.append((name, proc, log))
        codes = []
        try:
            for n, (name, proc, log) in enumerate(running, 1):
                codes.append(proc.wait())
                log.seek(0)
                took = time.monotonic() - start
                print(f"==== part {n}/{len(running)} ({name}): exit {codes[-1]}, {took:.0f} s ====")
                sys.stdout.write(log.read())
                sys.stdout.flush()
        finally:
            for _, proc, _ in running:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
    print(f"==== the suite in {len(running)} parts: {time.monotonic() - start:.0f} s ====")
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
