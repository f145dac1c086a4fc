"""`make gpu-check` (benchmarks/gpu_check.py) on CPU: the no-GPU exit through the Makefile, and the
step runner itself (budgets that stop a step and its workers, skips that say why, figures and CSV
rows written) on small real commands."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the check runs for real")
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_without_cuda_exits_zero_saying_so(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}", f"OUT={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU on this machine" in proc.stdout
    assert not out.exists()  # nothing measured, nothing written


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_a_step_past_its_budget_is_stopped_with_its_workers(tmp_path):
    pid_file = tmp_path / "worker.pid"
    worker = "import time; time.sleep(120)"
    parent = (
        "import subprocess, sys, time; "
        f"w = subprocess.Popen([sys.executable, '-c', {worker!r}]); "
        f"open({str(pid_file)!r}, 'w').write(str(w.pid)); print('started', flush=True); time.sleep(120)"
    )
    t0 = time.monotonic()
    rc, out = gpu_check.run_step([sys.executable, "-c", parent], dict(os.environ), 5, tmp_path / "log")
    assert rc is None and time.monotonic() - t0 < 60
    assert "started" in out and "started" in (tmp_path / "log").read_text()
    worker_pid = int(pid_file.read_text())
    for _ in range(50):
        if not _alive(worker_pid):
            break
        time.sleep(0.1)
    assert not _alive(worker_pid)


def _step(name, code, **kw):
    return gpu_check.Step(
        name, kw.pop("budget", 60), f"{name} step", lambda c: [sys.executable, "-c", code],
        lambda c, log: gpu_check._last_json(log, "value"), **kw,
    )  # fmt: skip


def test_check_records_figures_and_says_why_it_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "benchmarks.csv")
    monkeypatch.setattr(gpu_check, "KERNEL_RESULTS", tmp_path / "kernels.csv")
    tests = tmp_path / "test_tiny.py"
    tests.write_text(
        "import pytest\n"
        "def test_ok(): assert 1\n"
        "def test_bad(): assert 0\n"
        "@pytest.mark.skip(reason='x')\ndef test_skip(): pass\n"
    )
    steps = [
        _step("measure", "import json; print('warming up'); print(json.dumps({'value': 3.5, 'note': 'x'}))"),
        gpu_check.Step(
            "tests", 60, "pytest", lambda c: gpu_check._pytest(c, "tests", [str(tests)], None),
            lambda c, _: gpu_check._junit(c, "tests"),
        ),
        _step("needs-module", "print(1)", needs=("no_such_module_for_gpu_check",)),
        _step("after-skipped", "print(1)", after=("needs-module",)),
        _step("slow", "import time; time.sleep(60)", budget=2),
        _step("broken", "import sys; print('boom'); sys.exit(3)"),
    ]  # fmt: skip
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    ctx = gpu_check.Context(sys.executable, out, work, dict(os.environ), [])
    meta = {"date": "d", "commit": "c", "device": "cpu", "torch": "t", "triton": "tr", "cuda": None}
    assert gpu_check.check(ctx, steps, meta, time.monotonic() + 300) is False

    report = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert report["measure"]["status"] == "passed" and report["measure"]["figures"]["value"] == 3.5
    assert report["tests"]["status"] == "failed"  # one test failed: rc 1
    t = report["tests"]["figures"]
    assert (t["passed"], t["failures"], t["skipped"]) == (1, 1, 1) and t["failed"][0].endswith("test_bad")
    assert "no_such_module_for_gpu_check does not import" in report["needs-module"]["reason"]
    assert "WHEELS" in report["needs-module"]["reason"]
    assert report["after-skipped"]["status"] == "skipped"
    assert "needs-module skipped" in report["after-skipped"]["reason"]
    assert report["slow"]["status"] == "timed out" and report["slow"]["seconds"] < 30
    assert report["broken"]["status"] == "failed" and report["broken"]["reason"] == "rc 3: boom"

    rows = (out / "benchmarks_results.csv").read_text().splitlines()
    assert rows[0].split(",") == gpu_check.FIELDS
    assert "d,c,cpu,t,tr,,measure,value,3.5" in rows and "d,c,cpu,t,tr,,tests,passed,1" in rows
    assert (tmp_path / "benchmarks.csv").read_text().splitlines() == rows
    assert not (out / "kernels_results.csv").exists()  # kernels/results.csv gained no row
    summary = gpu_check.summary(ctx.results)
    assert all(name in summary for name in ("measure", "needs-module", "slow", "timed out"))


def test_readme_lists_every_step_with_its_budget():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## GPU acceptance run") :]
    for step in gpu_check.STEPS:
        assert f"| `{step.name}` | {step.budget_s} s |" in section, step.name
    assert f"{sum(s.budget_s for s in gpu_check.STEPS)} s" in section


def test_a_stopped_kernel_benchmark_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    kernels_csv = tmp_path / "kernels.csv"
    kernels_csv.write_text(",".join(["date", "copy_gb_s", "ms"]) + "\nold,1.0,2.0\n")
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "benchmarks.csv")
    monkeypatch.setattr(gpu_check, "KERNEL_RESULTS", kernels_csv)
    code = (
        f"open({str(kernels_csv)!r}, 'a').write('new,4300.5,0.25\\n'); print('row', flush=True); "
        "import time; time.sleep(60)"
    )
    step = gpu_check.Step(
        "kernels-bench", 3, "bench", lambda c: [sys.executable, "-c", code], gpu_check._kernel_figures
    )
    out = tmp_path / "out"
    out.mkdir()
    ctx = gpu_check.Context(sys.executable, out, tmp_path, dict(os.environ), [])
    meta = {"date": "d", "commit": "c", "device": "cpu", "torch": "t", "triton": "tr", "cuda": None}
    assert gpu_check.check(ctx, [step], meta, time.monotonic() + 300) is False
    entry = ctx.results["kernels-bench"]
    assert entry["status"] == "timed out" and entry["figures"]["partial"] is True
    assert entry["figures"]["results"] == [{"date": "new", "copy_gb_s": "4300.5", "ms": "0.25"}]
    assert (out / "kernels_results.csv").read_text() == "date,copy_gb_s,ms\nnew,4300.5,0.25\n"
    assert "d,c,cpu,t,tr,,kernels-bench,copy_gb_s,4300.5" in (out / "benchmarks_results.csv").read_text()


def test_peak_memory_follows_the_command_output(capsys):
    from benchmarks import peak_memory

    assert peak_memory.main(["info", "configs/demo.yaml", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-2])["dataset"] == "treesatai_ts"  # the command's own JSON line
    peak = json.loads(lines[-1])["peak_memory"]
    if torch.cuda.is_available():
        assert peak["reserved_bytes"] >= peak["allocated_bytes"] >= 0
    else:
        assert peak == {}


def _wheel(folder: Path, name: str, source: str) -> Path:
    """A minimal pure-Python wheel, built by hand (no build backend, no network)."""
    import base64
    import hashlib
    import zipfile

    files = {
        f"{name}/__init__.py": source,
        f"{name}-0.1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
        f"{name}-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},{len(text.encode())}"
        for path, text in files.items()
    ]
    files[f"{name}-0.1.dist-info/RECORD"] = "\n".join([*record, f"{name}-0.1.dist-info/RECORD,,"]) + "\n"
    path = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in files.items():
            z.writestr(member, text)
    return path


@pytest.mark.skipif(importlib.util.find_spec("pip") is None, reason="needs pip")
def test_wheels_from_a_local_folder_reach_the_steps(tmp_path, monkeypatch, capsys):
    """With CUDA reported, the run installs WHEELS offline, a step needing that module runs with it
    on its path, the figures and the summary say what ran and what was skipped."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "gpucheck_probe", "VALUE = 42\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "environment", lambda: {k: k for k in gpu_check.FIELDS[:6]})
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "benchmarks.csv")
    monkeypatch.setattr(gpu_check, "KERNEL_RESULTS", tmp_path / "kernels.csv")
    code = "import json, gpucheck_probe; print(json.dumps({'value': gpucheck_probe.VALUE}))"
    steps = [
        _step("probe", code, needs=("gpucheck_probe",)),
        _step("absent", "print(1)", needs=("no_such_module_for_gpu_check",)),
    ]
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    monkeypatch.setattr(sys, "path", list(sys.path))
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--work", str(tmp_path / "work"), "--wheels", str(wheels)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["environment"]["wheels"]["files"] == ["gpucheck_probe-0.1-py3-none-any.whl"]
    assert report["steps"]["probe"]["figures"] == {"value": 42}
    assert (tmp_path / "work" / "site" / "gpucheck_probe" / "__init__.py").exists()
    printed = capsys.readouterr().out
    assert "skipped absent: no_such_module_for_gpu_check does not import" in printed
    assert "$ " in (out / "gpu_check.log").read_text()  # each command is logged before its output
