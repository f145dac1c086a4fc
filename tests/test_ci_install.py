""".ci/install.sh's control flow, with a recording stand-in for the venv's Python and for nvidia-smi
(no network, nothing installed): CPU machines take the CPU torch and never flash-attn; CUDA machines
get no flash-attn build unless asked (FLASH_ATTN=1), or a prebuilt wheel from a local folder only."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _install(tmp_path: Path, gpu: bool, **env: str) -> tuple[str, list[str]]:
    """Runs the installer against a fake venv; returns its output and the fake Python's calls."""
    calls, bin_dir, venv = tmp_path / "calls", tmp_path / "bin", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\ncase "$*" in *"import torch"*) echo 2.13.0;; esac\n')
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nexit {0 if gpu else 1}\n")
    for f in (python, smi):
        f.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(
        ["bash", ".ci/install.sh", str(venv)], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("FLASH_ATTN")}, "PATH": path, **env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, calls.read_text().splitlines()


def test_cpu_takes_the_cpu_torch_and_never_flash_attn(tmp_path):
    out, calls = _install(tmp_path, gpu=False, FLASH_ATTN="1")
    assert calls[0] == "-m pip install -q torch==2.13.0+cpu"
    assert not [c for c in calls if "flash-attn" in c] and "cuda=0" in out


def test_cuda_builds_no_flash_attn_unless_asked(tmp_path):
    out, calls = _install(tmp_path, gpu=True)
    assert calls[0] == "-m pip install -q torch==2.13.0"
    assert not [c for c in calls if "flash-attn" in c]
    assert "FLASH_ATTN=1 builds it" in out and "model.attention=sdpa is used" in out


@pytest.mark.parametrize("mode", ["wheels", "build"])
def test_cuda_flash_attn_from_a_wheel_folder_or_an_opt_in_build(tmp_path, mode):
    env = {"FLASH_ATTN_WHEELS": str(tmp_path / "wheels")} if mode == "wheels" else {"FLASH_ATTN": "1"}
    _, calls = _install(tmp_path, gpu=True, **env)
    (flash,) = [c for c in calls if "flash-attn" in c]
    if mode == "wheels":
        assert (
            f"--no-index --find-links {tmp_path / 'wheels'}" in flash and "--no-build-isolation" not in flash
        )
    else:
        assert "--no-build-isolation" in flash and "--no-index" not in flash


def test_make_test_parts_hold_every_test_file_once():
    """`make test`'s two pytest processes (tests/run_parts.py): the named files in the first, the
    others in the second (it ignores exactly the first's), so no file runs twice or not at all."""
    import run_parts  # beside this file, importable as conftest is

    (_, first), (_, rest) = run_parts.parts()
    tests = run_parts.TESTS
    assert rest[0] == str(tests) and sorted(rest[1:]) == sorted(f"--ignore={f}" for f in first)
    everything = {str(f) for f in tests.glob("test_*.py")}
    assert set(first) < everything and len(first) == len(set(first)) == len(run_parts.FIRST)
    assert "$(PY) tests/run_parts.py" in (REPO / "Makefile").read_text()
