"""The offline GPU acceptance run: `make gpu-check [OUT=gpu-check-out] [WHEELS=dir] [STEP_ARGS=...]`.

    python benchmarks/gpu_check.py [--out DIR] [--wheels DIR] [--only a,b] [--list] [STEP_ARGS ...]

Run it first whenever a CUDA GPU is at hand. It needs a Python that already has torch and triton and
the repository's light dependencies (numpy, einops, pyyaml, fsspec, h5py, tifffile, pytest), and it
reaches no network: the only install is of wheels from a local folder (`--wheels DIR`: `pip install
--no-index --no-deps` into build/gpu-check/site, first on the steps' PYTHONPATH); it never runs
.ci/install.sh. Each step runs in its own process group and is stopped when it overruns its budget;
the budgets sum to the 8-minute limit (`TOTAL_S`) on one H200, and the run as a whole stops there.
A step whose module is missing (deepspeed for the training step) is skipped, saying so.

Every figure goes to OUT/gpu_check.json (rewritten after each step, so an interrupted run keeps what
it measured) and every step's output to OUT/gpu_check.log. New rows are appended to
kernels/results.csv (by `kernels.bench`) and benchmarks/results.csv, and copied, with their header, to
OUT/kernels_results.csv and OUT/benchmarks_results.csv (on a lent machine only OUT comes back).
Without CUDA it says so and exits 0; with CUDA it exits 1 if a step failed or overran.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import glob
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results.csv"
KERNEL_RESULTS = REPO / "kernels" / "results.csv"
FIELDS = ["date", "commit", "device", "torch", "triton", "cuda", "step", "name", "value"]
TOTAL_S = 480  # the whole run, on one H200
SYNTH_SAMPLES = 256  # the loader streams epoch after epoch: enough for 23 steps of 32 on 16 shards


@dataclass
class Context:
    python: str
    out: Path
    work: Path  # build/gpu-check: synthetic split, junit files, wheel site (never under OUT)
    env: dict[str, str]
    step_args: list[str]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    kernel_rows: int = 0  # lines kernels/results.csv had before the run

    @property
    def split(self) -> str:
        return str(self.work / "flair_hub" / "train")


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int
    what: str
    command: Callable[[Context], list[str]]
    figures: Callable[[Context, str], dict[str, Any]]
    needs: tuple[str, ...] = ()  # modules that must import
    after: tuple[str, ...] = ()  # steps that must have passed


def _last_json(log: str, key: str | None = None) -> dict[str, Any]:
    """The last JSON object line of a step's output (holding `key`, if given)."""
    for line in reversed(log.splitlines()):
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if key is None or key in obj:
                return obj
    raise ValueError(f"no JSON line{f' with {key!r}' if key else ''} in the output")


def _pytest(ctx: Context, name: str, files: list[str], marker: str | None) -> list[str]:
    """The pytest command for `files` (none: no command, the step is skipped)."""
    if not files:
        return []
    xdist = ["-n", "8"] if importlib.util.find_spec("xdist") else []
    cmd = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *xdist]
    return [*cmd, *(["-m", marker] if marker else []), f"--junitxml={ctx.work / name}.xml", *files]


def _junit(ctx: Context, name: str) -> dict[str, Any]:
    root = ET.parse(ctx.work / f"{name}.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": failed,
    }


def _gpu_test_files() -> list[str]:
    """Test files holding GPU-marked tests, the kernel tests excepted (their own step runs them)."""
    files = sorted(glob.glob(str(REPO / "tests" / "test_*.py")))
    return [
        os.path.relpath(f, REPO)
        for f in files
        if "pytest.mark.gpu" in Path(f).read_text() and not Path(f).name.startswith("test_kernels_")
    ]


def _kernel_test_files() -> list[str]:
    return [os.path.relpath(f, REPO) for f in sorted(glob.glob(str(REPO / "tests" / "test_kernels_*.py")))]


def _flair_hub(ctx: Context) -> list[str]:
    """configs/flair_hub.yaml on the synthetic split, one local GPU, outputs kept local."""
    runs = f"run.storage={ctx.work / 'runs'}"
    return ["configs/flair_hub.yaml", f"data.shards={ctx.split}", "run.use_gpu=true", runs]


def _kernel_figures(ctx: Context, log: str) -> dict[str, Any]:
    """The benchmark's JSON; from a run stopped midway, the rows it had appended to results.csv."""
    try:
        return _last_json(log, "results")
    except ValueError:
        with KERNEL_RESULTS.open(newline="") as f:
            rows = list(csv.DictReader(f))[max(ctx.kernel_rows - 1, 0) :]
        if not rows:
            raise
        return {"gpu": True, "partial": True, "copy_gb_s": float(rows[0]["copy_gb_s"]), "results": rows}


def _step_figures(ctx: Context, log: str) -> dict[str, Any]:
    return {**_last_json(log, "mfu"), **_last_json(log, "peak_memory")}


STEPS = [
    Step(
        "gpu-tests", 45, "pytest -m gpu on the test files holding GPU tests (kernel tests excepted)",
        lambda c: _pytest(c, "gpu-tests", _gpu_test_files(), "gpu"),
        lambda c, _: _junit(c, "gpu-tests"), needs=("pytest",),
    ),
    Step(
        "kernel-tests", 90, "pytest tests/test_kernels_*.py, kernels compiled for the device",
        lambda c: _pytest(c, "kernel-tests", _kernel_test_files(), None),
        lambda c, _: _junit(c, "kernel-tests"), needs=("pytest",),
    ),
    Step(
        "kernels-bench", 120, "python -m kernels.bench at FLAIR-HUB shapes: triton, eager, torch.compile",
        lambda c: [c.python, "-m", "kernels.bench", "--presets", "flair_hub", "--runs", "50", "--json"],
        _kernel_figures, needs=("triton",),
    ),
    Step(
        "synth", 40, f"maestro shards synth: a synthetic FLAIR-HUB split of {SYNTH_SAMPLES} samples",
        lambda c: [
            c.python, "-m", "maestro.cli", "shards", "synth", str(c.work / "flair_hub"), "--preset", "flair_hub",
            "--samples", str(SYNTH_SAMPLES), "--shard-samples", "16", "--workers", "8", "--overwrite",
            "--no-progress", "--json",
        ],
        lambda c, log: _last_json(log, "samples"),
    ),
    Step(
        "attention", 45, "SDPA flash / cuDNN / efficient (and flash-attn) on the model's own shapes",
        lambda c: [c.python, "-m", "benchmarks.attention", *_flair_hub(c), *c.step_args, "--json"],
        lambda c, log: _last_json(log, "per_forward_ms"), after=("synth",),
    ),
    Step(
        "bench-step", 130, "maestro bench step configs/flair_hub.yaml: base, bf16, 1 GPU, DeepSpeed, no Ray",
        lambda c: [
            c.python, "-m", "benchmarks.peak_memory", "bench", "step", *_flair_hub(c), "model.size=base",
            "train.precision=bf16", *c.step_args, "--steps", "20", "--warmup", "3", "--json",
        ],
        _step_figures, needs=("deepspeed",), after=("synth",),
    ),
]  # fmt: skip


def run_step(cmd: list[str], env: dict[str, str], timeout_s: float, log: Path) -> tuple[int | None, str]:
    """Run `cmd` in its own process group; past `timeout_s` the whole group is stopped (rc None).
    Returns (rc, its output), the output also appended to `log`."""
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        start = f.tell()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _stop_group(proc)
    with log.open() as f:
        f.seek(start)
        return rc, f.read()


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to a step's process group (its workers too, whatever its exit), SIGKILL to what is
    left 10 s later."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _nvidia_gpu() -> bool:
    """Whether the driver lists a GPU (for a Python without torch to tell why it stops)."""
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str:
    """GIT_COMMIT if set (a copy of the tree without .git), else git's short HEAD."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return proc.stdout.strip() or "unknown"


def environment() -> dict[str, Any]:
    import torch
    import triton

    props = torch.cuda.get_device_properties(0)
    driver = (
        shutil.which("nvidia-smi")
        and subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "device": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver or None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "deepspeed": _version("deepspeed"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
    }


def install_wheels(wheels: Path, site: Path, python: str, log: Path) -> dict[str, Any]:
    """Every wheel (or sdist) in `wheels` into `site`, offline: --no-index, --no-deps."""
    files = sorted(str(p) for p in wheels.iterdir() if p.name.endswith((".whl", ".tar.gz", ".zip")))
    if not files:
        return {"status": "skipped", "reason": f"{wheels} holds no .whl/.tar.gz/.zip"}
    shutil.rmtree(site, ignore_errors=True)
    cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation"]
    cmd += ["--disable-pip-version-check", "--target", str(site), *files]
    rc, _ = run_step(cmd, {**os.environ, "DS_BUILD_OPS": "0"}, 60, log)
    ok = rc == 0
    return {"status": "passed" if ok else "failed", "files": [Path(f).name for f in files], "rc": rc}


def csv_rows(step: str, figures: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, value) pairs of a step's headline figures for benchmarks/results.csv."""
    if step in ("gpu-tests", "kernel-tests"):
        return [(k, figures[k]) for k in ("passed", "failures", "errors", "skipped")]
    if step == "kernels-bench":
        return [("copy_gb_s", figures["copy_gb_s"])]
    if step == "attention":
        rows = [(f"{b} per forward fwd+bwd ms", v) for b, v in figures["per_forward_ms"].items()]
        for s in figures["shapes"]:
            for backend, ms in s["fwd_bwd_ms"].items():
                if isinstance(ms, float):
                    rows.append(
                        (
                            f"{backend} S={s['seqs']} H={s['heads']} L={s['len']} D={s['dim_head']} fwd+bwd ms",
                            ms,
                        )
                    )
        return rows
    if step == "bench-step":
        rows = [(k, v) for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return rows + [(f"peak_memory_{k}", v) for k, v in figures["peak_memory"].items()]
    return [(k, v) for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _append_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _copy_new_rows(src: Path, before: int, dest: Path) -> None:
    """The header and the rows `src` gained after its first `before` lines, into `dest`."""
    if not src.exists():
        return
    lines = src.read_text().splitlines(keepends=True)
    if len(lines) > max(before, 1):
        dest.write_text(lines[0] + "".join(lines[max(before, 1) :]))


def check(ctx: Context, steps: list[Step], meta: dict[str, Any], deadline: float) -> bool:
    """Run `steps` in order within their budgets and `deadline`; True if none failed or overran."""
    report = {"gpu": True, "environment": meta, "total_budget_s": TOTAL_S, "steps": ctx.results}
    log = ctx.out / "gpu_check.log"
    kernel_rows = ctx.kernel_rows = (
        len(KERNEL_RESULTS.read_text().splitlines()) if KERNEL_RESULTS.exists() else 0
    )
    own_rows = len(RESULTS.read_text().splitlines()) if RESULTS.exists() else 0
    ok = True
    for step in steps:
        left = deadline - time.monotonic()
        entry: dict[str, Any] = {"what": step.what, "budget_s": step.budget_s}
        missing = _missing(step.needs)
        blocked = [a for a in step.after if ctx.results.get(a, {}).get("status") != "passed"]
        if missing:
            wheels = "; WHEELS=dir with its wheels installs it offline"
            entry |= {"status": "skipped", "reason": f"{', '.join(missing)} does not import{wheels}"}
        elif blocked:
            why = ", ".join(f"{a} {ctx.results.get(a, {}).get('status', 'not run')}" for a in blocked)
            entry |= {"status": "skipped", "reason": f"needs {why}"}
        elif left < 10:
            entry |= {"status": "skipped", "reason": f"{left:.0f} s left of the {TOTAL_S} s run"}
        elif not (cmd := step.command(ctx)):
            entry |= {"status": "skipped", "reason": "nothing to run (no test file selected)"}
        else:
            print(f"gpu-check: {step.name} (budget {step.budget_s} s): {step.what}", flush=True)
            t0 = time.monotonic()
            rc, out = run_step(cmd, ctx.env, min(step.budget_s, left), log)
            entry |= {"seconds": round(time.monotonic() - t0, 1), "rc": rc}
            try:
                entry["figures"] = step.figures(ctx, out)
            except (ValueError, OSError, ET.ParseError, KeyError) as e:
                entry["figures_error"] = f"{type(e).__name__}: {e}"
            if rc is None:
                entry |= {"status": "timed out", "reason": f"stopped after {min(step.budget_s, left):.0f} s"}
            elif rc == 0 and "figures" in entry:
                entry["status"] = "passed"
            else:
                tail = out.strip().splitlines()[-1:] or [""]
                entry |= {"status": "failed", "reason": f"rc {rc}: {tail[0][:300]}"}
            if "figures" in entry:
                try:
                    pairs = csv_rows(step.name, entry["figures"])
                except (KeyError, TypeError, AttributeError) as e:  # figures of an unexpected shape
                    pairs, entry["rows_error"] = [], f"{type(e).__name__}: {e}"
                fixed = {k: meta[k] for k in FIELDS[:6]}
                _append_csv(
                    RESULTS, FIELDS, [fixed | {"step": step.name, "name": n, "value": v} for n, v in pairs]
                )
        ok &= entry["status"] in ("passed", "skipped")
        ctx.results[step.name] = entry
        (ctx.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        print(
            f"gpu-check: {step.name}: {entry['status']}{' - ' + entry['reason'] if 'reason' in entry else ''}"
        )
    _copy_new_rows(KERNEL_RESULTS, kernel_rows, ctx.out / "kernels_results.csv")
    _copy_new_rows(RESULTS, own_rows, ctx.out / "benchmarks_results.csv")
    return ok


def summary(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'step':14} {'status':10} {'seconds':>8} {'budget':>7}  reason"]
    for name, r in results.items():
        secs = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        lines.append(f"{name:14} {r['status']:10} {secs:>8} {r['budget_s']:>7}  {r.get('reason', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", default="gpu-check-out", help="folder for gpu_check.json, the log and new CSV rows"
    )
    p.add_argument("--wheels", default="", help="local folder of extra wheels (installed with --no-index)")
    p.add_argument("--work", default=str(REPO / "build" / "gpu-check"), help="synthetic split, wheel site")
    p.add_argument("--only", default="", help="comma list of steps to run (default: all)")
    p.add_argument("--list", action="store_true", help="print the steps and their budgets, run nothing")
    p.add_argument(
        "step_args", nargs="*", help="key=value overrides for the attention and bench-step configs"
    )
    args = p.parse_args(argv)
    steps = [s for s in STEPS if not args.only or s.name in args.only.split(",")]
    if args.list:
        for s in steps:
            print(f"{s.name:14} {s.budget_s:4d} s  {s.what}")
        print(f"{'total':14} {TOTAL_S:4d} s  (the run stops there)")
        return 0
    deadline = time.monotonic() + TOTAL_S
    try:
        import torch
    except ImportError as e:
        if not _nvidia_gpu():
            print(f"gpu-check: no CUDA GPU on this machine (and torch does not import: {e}): nothing run")
            return 0
        print(
            f"gpu-check: torch does not import in {sys.executable} ({e}); GPU_PYTHON= picks one that has it"
        )
        return 1
    if not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA GPU on this machine (torch {torch.__version__}): nothing run, nothing written"
        )
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.log").write_text("")
    # Kernels compile for the device: the Triton interpreter stays off in every step.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    paths = [str(REPO)]
    installed = None
    if args.wheels:
        site = work / "site"
        installed = install_wheels(Path(args.wheels), site, sys.executable, out / "gpu_check.log")
        if installed["status"] == "passed":
            paths.insert(0, str(site))
            sys.path.insert(0, str(site))
            importlib.invalidate_caches()
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    meta = environment()
    env["GIT_COMMIT"] = meta["commit"]  # the same commit in every step's rows
    print(f"gpu-check: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}")
    ctx = Context(sys.executable, out, work, env, args.step_args)
    if installed is not None:
        meta["wheels"] = installed
    ok = check(ctx, steps, meta, deadline)
    print(summary(ctx.results))
    skipped = {n: r["reason"] for n, r in ctx.results.items() if r["status"] == "skipped"}
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    print(f"gpu-check: figures in {out / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
