"""Launch pretraining on Ray Train: the embedded local default or a Ray cluster at `run.address`.

`launch(cfg)` checks that the run fits the machine or cluster (`resources`), starts (or joins)
Ray, runs `TorchTrainer` with `run.workers` workers (one GPU each with `run.use_gpu`,
`run.cpus_per_worker` CPUs each; NCCL on GPUs, gloo on CPU), passes the config only through
`train_loop_config`, and stores Ray's run state beside the checkpoints in
`RunConfig(storage_path=run.storage, name=run.name)`. `FailureConfig(max_failures=run.max_failures,
max_preemption_failures=run.max_preemptions)` restarts the whole worker group after a crash or a
preemption; the restarted workers resume from the newest complete checkpoint, as does a later
`maestro pretrain` of the same run name.

`run.workers=[MIN, MAX]` is Ray Train v2's elastic `ScalingConfig(num_workers=(MIN, MAX))`: a lost
node restarts the group with the workers the cluster still holds (at least MIN), and every
`run.resize_check_s` Ray looks for room to grow back toward MAX. The loop keeps the global batch
at every size (`config.accumulation`) and resumes the checkpoint in its universal form when the
world size changed. Every worker asks Ray Train for a preemption notice at each log step
(`preemption_notice`); while one stands, each log step writes a checkpoint.

Each launch starts (or joins) Ray and stops it when it ends; the launches inside `one_ray()` (the
chain of `maestro evaluate`) share the first one's.

A local Ray binds every service to 127.0.0.1 (`maestro.local_ray`) and uses Ray's token
authentication (on by default in Ray 2.60). Only maestro's lines reach the terminal (`console`):
Ray's and the libraries' output goes to `RUN/logs`.

Errors that would repeat are not retried: a worker raising a `MaestroError` (a bad config,
shard, checkpoint) records it in `RUN/error.json` before failing; the workers Ray restarts find
it and return at once, and the driver raises that error with its own message. Any other failure
is retried up to `run.max_failures` times and then reported as one line naming the worker's
exception.

A SIGTERM to a worker's process (a spot VM shutting down) is taken as a preemption notice: the
ranks agree on it at the next log step, which writes a checkpoint, and training goes on
(`Terminated`).

Ctrl-C or SIGTERM on the driver writes `RUN/STOP`: the workers notice it at their next log step,
write a final checkpoint and return. A second signal aborts. (`fit` runs off the main thread so
that Ray's own SIGINT handler, which aborts the workers at once, stays out of the way.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue as queue_module
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cluster import resources
from cluster.console import LOG_DIR, RunLog, forward_stdout
from maestro import config, errors, local_ray, storage
from maestro.config import Config
from maestro.errors import MaestroError
from maestro.train import loop

OBJECT_STORE_BYTES = 512 * 2**20  # checkpoints go to storage, not the object store
ERROR_FILE = "error.json"


def payload(cfg: Config) -> dict[str, Any]:
    """The config as plain data for `train_loop_config` (resolved again on each worker).

    Local paths become absolute: Ray workers run in their own working directories.
    """
    raw = {k: v for k, v in cfg.to_dict().items() if k != "derived"}
    for section, key in (("data", "shards"), ("run", "storage")):
        value = raw[section][key]
        if value and "://" not in value:
            raw[section][key] = os.path.abspath(value)
    return {"config": raw}


def record_error(url: str, error: MaestroError) -> None:
    storage.write_bytes(url, json.dumps({"error": type(error).__name__, "message": str(error)}).encode())


def recorded_error(url: str) -> MaestroError | None:
    if not storage.exists(url):
        return None
    report = json.loads(storage.read_bytes(url))
    return errors.by_name(report["error"], report["message"])


def _inloop_probe(cfg: Config) -> loop.Probe | None:
    """The downstream probe the trainer runs every `eval.every` steps (None when off)."""
    if not cfg.eval.every:
        return None
    from maestro.eval.inloop import probe_scores

    return probe_scores


def worker_entry(
    loop_config: dict[str, Any], on_step: Callable[[int, Any, list], None] | None = None
) -> None:
    """The Ray Train worker function.

    Divergence ends the worker normally (its summary says so): a restart from the last
    checkpoint would only diverge again. A `MaestroError` is recorded for the driver and raised;
    a restarted worker that finds it recorded returns at once instead of failing the same way.
    While it trains, a SIGTERM to the worker's process is a preemption notice (`Terminated`).
    """
    import ray.train

    error_url = loop_config.get("error_url")
    if error_url and storage.exists(error_url):
        return
    rank = ray.train.get_context().get_world_rank()
    try:
        cfg = config.from_dict(loop_config["config"])
        with forward_stdout(loop_config.get("console"), rank), Terminated():
            loop.train(cfg, on_step, preemption_notice, probe=_inloop_probe(cfg))
    except loop.Diverged:
        return
    except MaestroError as e:
        if error_url:
            record_error(error_url, e)
        raise


class Terminated:
    """SIGTERM on a Ray Train worker (what a spot VM's shutdown sends the processes on it): the
    first sets `RECEIVED` and training goes on (`preemption_notice` makes it a notice: a
    checkpoint at each log step); a second, or one after training, is Ray's own (the worker exits).

    The training function runs off the worker's main thread, where no handler can be set: the
    handler is set by the worker actor's main thread (`RayTrainWorker.execute`), and Ray's is put
    back the same way on exit.
    """

    RECEIVED = threading.Event()
    _ray_handler: Any = None

    @classmethod
    def _handle(cls, signum: int, frame: Any) -> None:
        if cls.RECEIVED.is_set() and callable(cls._ray_handler):
            cls._ray_handler(signum, frame)
        cls.RECEIVED.set()

    @classmethod
    def _install(cls) -> None:
        cls._ray_handler = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, cls._handle)

    @classmethod
    def _uninstall(cls) -> None:
        if signal.getsignal(signal.SIGTERM) == cls._handle:
            signal.signal(signal.SIGTERM, cls._ray_handler or signal.SIG_DFL)

    @staticmethod
    def _on_main_thread(fn: Callable[[], None]) -> None:
        import ray

        try:
            ray.get(ray.get_runtime_context().current_actor.execute.remote(fn))
        except Exception as e:  # not a Ray Train worker actor: SIGTERM stays Ray's own
            loop.console(f"SIGTERM on this worker ends it without a checkpoint ({e.__class__.__name__}: {e})")

    def __enter__(self) -> Terminated:
        Terminated.RECEIVED.clear()
        self._on_main_thread(Terminated._install)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._on_main_thread(Terminated._uninstall)


def preemption_notice() -> str | None:
    """A coming preemption of one of the run's nodes, as one line (None: nothing): what Ray Train
    knows of one (a node drain), or a SIGTERM received by any worker (`Terminated`). Every worker
    calls it at the same log steps: both are collective (Ray Train's is a barrier, the SIGTERM
    flags an all-reduce), so every rank gets the same answer."""
    import ray.train
    import torch

    info = ray.train.get_preemption_info()
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    gpu = torch.distributed.get_backend() == "nccl"
    flags = torch.zeros(world, device=torch.device("cuda", torch.cuda.current_device()) if gpu else "cpu")
    flags[rank] = float(Terminated.RECEIVED.is_set())
    torch.distributed.all_reduce(flags)
    termed = [r for r, f in enumerate(flags.tolist()) if f > 0]
    lines = []
    if info is not None:
        when = (
            ""
            if info.deadline_ms is None
            else f" by {time.strftime('%H:%M:%S', time.gmtime(info.deadline_ms / 1000))} UTC"
        )
        lines.append(
            f"node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} (rank(s) {info.preempted_ranks}) "
            f"to be preempted{when}"
        )
    if termed:
        lines.append(f"rank(s) {termed} received SIGTERM (their machine is shutting down)")
    return "; ".join(lines) or None


class _DriverStop:
    """First SIGINT/SIGTERM: ask the workers to checkpoint and stop; second: abort."""

    def __init__(self, stop_url: str, say: Callable[[str], None]):
        self.stop_url, self.say = stop_url, say
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _DriverStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        # No I/O inside the handler: it runs within Ray's blocking `get`, which turns any
        # exception raised there into an exit of the driver.
        self.__exit__()
        threading.Thread(target=self._write_stop, daemon=True).start()

    def _write_stop(self) -> None:
        storage.write_bytes(self.stop_url, b"stop requested by the driver\n")
        self.say("stopping: the workers write a checkpoint at their next log step (Ctrl-C again to abort)")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


class _Relay:
    """Rank 0's lines, from the workers' queue to the terminal, while `fit` runs."""

    def __init__(self, lines: Any, say: Callable[[str], None]):
        self.lines, self.say = lines, say
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maestro-relay", daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            self._drain(timeout=0.5)

    def _drain(self, timeout: float | None) -> None:
        from ray.util.queue import Empty

        try:
            while True:
                line = self.lines.get(timeout=timeout) if timeout else self.lines.get_nowait()
                self.say(line)
        except (Empty, queue_module.Empty):
            return

    def __enter__(self) -> _Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()
        self._drain(timeout=None)


def _fit_off_main_thread(trainer: Any) -> None:
    """`trainer.fit()` in a helper thread, so that Ray does not install its own SIGINT handler
    (which aborts the workers without a checkpoint) and the main thread keeps `_DriverStop`'s."""
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # re-raised in the main thread below
            failure.append(e)

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if failure:
        raise failure[0]


def start_local_ray(num_cpus: int, num_gpus: int, temp_dir: str) -> None:
    """A local Ray on 127.0.0.1 only (`maestro.local_ray`), its logs under `temp_dir`, none to the driver."""
    local_ray.start(
        num_cpus, num_gpus, object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False, _temp_dir=temp_dir
    )


def root_cause(error: BaseException) -> BaseException:
    """The exception a worker raised, under Ray's wrappers (TrainingFailedError, WorkerGroupError,
    the traceback wrapper, RayTaskError): the first maestro error found, else the innermost one."""
    pending, seen, leaf = [error], set(), error
    while pending:
        e = pending.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        failures = getattr(e, "worker_failures", None) or {}
        inner = [failures[r] for r in sorted(failures)]
        inner += [getattr(e, a, None) for a in ("_base_exc", "controller_failure", "cause")]
        inner = [x for x in inner if isinstance(x, BaseException)]
        if not inner and e.__cause__ is not None:
            inner = [e.__cause__]
        if inner:
            pending.extend(inner)
            continue
        if isinstance(e, MaestroError):
            return e
        if leaf is error:
            leaf = e
    return leaf


def _failure(error: BaseException, cfg: Config, logs: str) -> MaestroError:
    cause = root_cause(error)
    if isinstance(cause, MaestroError):
        return errors.by_name(type(cause).__name__, str(cause))
    text = (str(cause).strip().splitlines() or [""])[0]
    return errors.RunFailed(
        f"the workers failed ({type(cause).__name__}: {text}) after run.max_failures={cfg.run.max_failures} "
        f"restart(s); the workers' logs are in {logs}"
    )


def _keep_ray_logs(temp_dir: str, into: Path, remove: bool = True) -> None:
    """Ray's log files of a local run (services and workers) beside the driver's; the local Ray's
    folder is removed with `remove` (its last launch), else kept for the next launch."""
    logs = Path(temp_dir) / "session_latest" / "logs"
    if logs.is_dir():
        into.mkdir(parents=True, exist_ok=True)
        for f in logs.iterdir():
            if f.is_file():
                shutil.copyfile(f, into / f.name)
    if remove:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _files(cfg: Config) -> tuple[str, str, str]:
    """The run's STOP, summary and error files."""
    url = loop.run_url(cfg)
    return (
        storage.join(url, loop.STOP_FILE),
        storage.join(url, loop.SUMMARY_FILE),
        storage.join(url, ERROR_FILE),
    )


@dataclasses.dataclass
class RayUse:
    """How one launch uses Ray: `start` it (a local Ray in `local_dir`, else join `run.address`),
    `stop` it when the launch ends; `local_dir` is the local Ray's folder, whoever started it."""

    start: bool
    stop: bool
    local_dir: str = ""

    def describe(self, address: str) -> str:
        where = f"a local Ray on 127.0.0.1 in {self.local_dir}" if self.local_dir else ""
        if self.start:
            return f"started {where}" if where else f"joined the cluster at {address}"
        if where:
            return f"{where}, started by an earlier launch of this command"
        return "the Ray this process was connected to"


class _Shared:
    """The Ray of the launches inside `one_ray()`: whether a block is open, whether a launch in it
    started (or joined) Ray, and the local Ray's folder."""

    open = False
    started = False
    local_dir = ""


def _ray_use(cfg: Config) -> RayUse:
    import ray

    start = not ray.is_initialized()
    local_dir = tempfile.mkdtemp(prefix="ray-") if start and not cfg.run.address else ""
    if not _Shared.open:
        return RayUse(start=start, stop=start, local_dir=local_dir)
    if start:  # the first launch of the block starts the Ray the next ones use
        _Shared.started, _Shared.local_dir = True, local_dir
    return RayUse(start=start, stop=False, local_dir=_Shared.local_dir)


@contextlib.contextmanager
def one_ray() -> Iterator[None]:
    """The launches inside the block share one Ray: the first starts it as `launch` does (a local
    one on 127.0.0.1, or joined at `run.address`), the next ones use it, and it stops when the
    block ends (none is started when no launch runs). `maestro evaluate` runs pretraining, probe
    and fine-tune in one: one Ray start (~5 s and ~5 CPU-s on a laptop) instead of three. Each
    launch still starts its own worker group. Each launch's `RUN/logs/ray` holds Ray's logs up
    to its end."""
    if _Shared.open:  # inside another block: that block's Ray
        yield
        return
    _Shared.open = True
    try:
        yield
    finally:
        started, local_dir = _Shared.started, _Shared.local_dir
        _Shared.open, _Shared.started, _Shared.local_dir = False, False, ""
        if started:
            import ray

            ray.shutdown()
        if local_dir:
            shutil.rmtree(local_dir, ignore_errors=True)


def _run(cfg: Config, train_fn: Callable[[dict], None], log: RunLog, use: RayUse) -> None:
    """Start or join Ray as `use` says, check the resources, fit; a failure is raised as the
    workers' own error."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    gpu, r = config.uses_gpu(cfg), cfg.run
    low, high = config.worker_range(cfg)
    stop_url, _, error_url = _files(cfg)
    try:
        if use.start and use.local_dir:
            resources.check_local(cfg)
            start_local_ray(high * r.cpus_per_worker, high if gpu else 0, use.local_dir)
        else:  # a cluster, or a Ray already running in this process: what its nodes hold decides
            if use.start:
                ray.init(address=r.address, log_to_driver=False)
            resources.check_cluster(cfg, log.say)
        print(f"ray: {use.describe(r.address)}", flush=True)  # driver.log
        # On the driver's node, as Ray Train's own controller and synchronization actors: placed
        # anywhere, it could be on a worker node that goes, and every restarted worker would fail
        # on its first line.
        here = ray.get_runtime_context().get_node_id()
        lines = Queue(actor_options={"num_cpus": 0, "label_selector": {ray._raylet.RAY_NODE_ID_KEY: here}})
        trainer = TorchTrainer(
            train_fn,
            train_loop_config={**payload(cfg), "error_url": error_url, "console": lines},
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=(low, high) if low < high else high,
                elastic_resize_monitor_interval_s=r.resize_check_s,
                use_gpu=gpu,
                resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": 1} if gpu else {})},
            ),
            run_config=RunConfig(
                name=r.name,
                storage_path=storage.absolute(r.storage),
                failure_config=FailureConfig(
                    max_failures=r.max_failures, max_preemption_failures=r.max_preemptions
                ),
            ),
        )
        try:
            with _DriverStop(stop_url, log.say), _Relay(lines, log.say):
                _fit_off_main_thread(trainer)
        except TrainingFailedError as e:
            logs = storage.join(loop.run_url(cfg), LOG_DIR)
            raise (recorded_error(error_url) or _failure(e, cfg, logs)) from None
        finally:
            lines.shutdown()
    finally:
        if use.stop:
            ray.shutdown()
        if use.local_dir:
            _keep_ray_logs(use.local_dir, log.dir / "ray", remove=use.stop)


def launch(
    cfg: Config, train_fn: Callable[[dict], None] = worker_entry, log: RunLog | None = None
) -> dict[str, Any]:
    """Run (or resume) the run of `cfg` on Ray Train; returns rank 0's final summary.

    `log`: the caller's `RunLog` (already entered, kept by the caller); by default one of its own,
    kept in `RUN/logs`. Raises the workers' own `MaestroError`, or `RunFailed` once
    `run.max_failures` restarts are spent.
    """
    if log is not None:
        return _launch(cfg, train_fn, log)
    log = RunLog()
    try:
        with log:
            return _launch(cfg, train_fn, log)
    finally:
        log.keep(loop.run_url(cfg))


def _launch(cfg: Config, train_fn: Callable[[dict], None], log: RunLog) -> dict[str, Any]:
    files = _files(cfg)
    for stale in files:
        if storage.exists(stale):
            storage.remove(stale)
    _, summary_url, error_url = files
    _run(cfg, train_fn, log, _ray_use(cfg))
    failed = recorded_error(error_url)
    if failed is not None:
        raise failed
    summary = json.loads(storage.read_bytes(summary_url))
    if "diverged" in summary:
        raise loop.Diverged(summary["diverged"])
    return summary
