"""Launch pretraining on Ray Train: the embedded local default or a Ray cluster at `run.address`.

`launch(cfg)` starts (or joins) Ray, runs `TorchTrainer` with `run.workers` workers (one GPU each
with `run.use_gpu`, `run.cpus_per_worker` CPUs each; NCCL on GPUs, gloo on CPU), passes the config
only through `train_loop_config`, and stores Ray's run state beside the checkpoints in
`RunConfig(storage_path=run.storage, name=run.name)`. `FailureConfig(max_failures=run.max_failures)`
restarts the whole worker group after a crash; the restarted workers resume from the newest
complete checkpoint, as does a later `maestro pretrain` of the same run name.

Ctrl-C or SIGTERM on the driver writes `RUN/STOP`: the workers notice it at their next log step,
write a final checkpoint and return. A second signal aborts. (`fit` runs off the main thread so
that Ray's own SIGINT handler, which aborts the workers at once, stays out of the way.)
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from typing import Any

from maestro import config, storage
from maestro.config import Config
from maestro.train.loop import STOP_FILE, SUMMARY_FILE, Diverged, payload, run_url, worker_entry

OBJECT_STORE_BYTES = 512 * 2**20  # checkpoints go to storage, not the object store


class _DriverStop:
    """First SIGINT/SIGTERM: ask the workers to checkpoint and stop; second: abort."""

    def __init__(self, stop_url: str):
        self.stop_url = stop_url
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
        fs, path = storage.url_to_fs(self.stop_url)
        fs.pipe_file(path, b"stop requested by the driver\n")
        print(
            "stopping: the workers write a checkpoint at their next log step (signal again to abort)",
            flush=True,
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


def _remove(url: str) -> None:
    fs, path = storage.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path)


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


def launch(cfg: Config, train_fn: Callable[[dict], None] = worker_entry) -> dict[str, Any]:
    """Run (or resume) the run of `cfg` on Ray Train; returns rank 0's final summary.

    `trainer.fit()` raises Ray's `TrainingFailedError` once `run.max_failures` restarts are spent.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = config.uses_gpu(cfg)
    r = cfg.run
    started = not ray.is_initialized()
    if started and r.address:
        ray.init(address=r.address)
    elif started:
        ray.init(
            num_cpus=r.workers * r.cpus_per_worker,
            include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
        )
    resources = {"CPU": r.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=payload(cfg),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=r.name,
            storage_path=storage.absolute(r.storage),
            failure_config=FailureConfig(max_failures=r.max_failures),
        ),
    )
    stop_url, summary_url = f"{run_url(cfg)}/{STOP_FILE}", f"{run_url(cfg)}/{SUMMARY_FILE}"
    _remove(stop_url)
    _remove(summary_url)
    try:
        with _DriverStop(stop_url):
            _fit_off_main_thread(trainer)
    finally:
        if started:
            ray.shutdown()
    fs, path = storage.url_to_fs(summary_url)
    summary = json.loads(fs.cat_file(path))
    if "diverged" in summary:
        raise Diverged(summary["diverged"])
    return summary
