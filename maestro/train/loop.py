"""The pretraining loop: the same function in a Ray Train worker and in a plain single process.

`train(cfg)` joins the process group, builds the model, the DeepSpeed engine (optimizer and
schedule from `optim`), the EMA and this rank's shard stream, resumes from the checkpoint that
`resume.plan` accepts (the newest that verifies, under a config allowed to continue it), and
trains to `train.steps`. The hot loop never waits on the device: losses
stay on it until a log step (`metrics.Interval`), where ranks also agree on divergence and on a
stop request. A checkpoint is written every `train.checkpoint_every` steps, at the end, and when a
stop is requested (SIGINT/SIGTERM in a plain process, the `STOP` file of the run under Ray); and
at every log step once a preemption notice has arrived (`notice`, polled at log steps), while
training goes on until the node goes. With `train.checkpoint_async` (the default) a checkpoint
holds training only while the engine state is copied to host memory: a writer thread writes it
while training goes on (`checkpoint.BackgroundWriter`, one write in flight, the next save and the
end of the run wait for it), and it counts once its digests and marker are written.

The global batch is the run's at every world size (`config.accumulation`): an elastic run that
restarts on fewer or more workers accumulates more or fewer micro-batches per optimizer step, and
its schedule and step count continue from the checkpoint.

Masks are drawn from a generator reseeded from (seed, step, rank, micro-batch) at every step, so a
resumed run draws the masks the uninterrupted one would have.
"""

from __future__ import annotations

import copy
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from maestro import config, storage
from maestro.config import Config
from maestro.errors import CheckpointError, Diverged
from maestro.model import padded
from maestro.model.ema import EMA
from maestro.parallel import dist
from maestro.parallel.deepspeed import build_engine, local_shards
from maestro.train import checkpoint, metrics, optim, resume

# The in-loop probe: (cfg, model, device) -> {TensorBoard tag: value}.
Probe = Callable[[Config, Any, torch.device], dict[str, float]]

STOP_FILE = "STOP"
SUMMARY_FILE = "summary.json"


def run_url(cfg: Config) -> str:
    """`run.storage/run.name`: an absolute local path or an `s3://` URL."""
    return storage.join(storage.absolute(cfg.run.storage), cfg.run.name)


def console(line: str) -> None:
    """One line on stdout. Not `print`: under Ray Train `print` is patched to also go through
    Train's logger, and every line would show twice in the driver's output."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def mask_seed(seed: int, step: int, rank: int, micro: int) -> int:
    return ((seed * 1_000_003 + step) * 4099 + rank) * 257 + micro


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Model inputs to the device as they are (the model casts what it computes with, so targets
    and their statistics come from the loader's own values), except those the model reads on the
    host (`padded.HOST_INPUT_SUFFIXES`); loader bookkeeping (`_` keys) stays behind."""
    return {
        k: v.to(device, non_blocking=True)
        if isinstance(v, torch.Tensor) and not k.endswith(padded.HOST_INPUT_SUFFIXES)
        else v
        for k, v in batch.items()
        if not k.startswith("_")
    }


def reports(step: int, c: Any) -> bool:
    """Whether `step` is a log step: every `log_every`, every checkpoint and the last step."""
    return step % c.log_every == 0 or step % c.checkpoint_every == 0 or step == c.steps


class Stepper:
    """One optimizer step: `grad_accum` micro-batches through forward, backward and the engine step."""

    def __init__(self, engine: Any, ema: EMA | None, device: torch.device, seed: int, rank: int):
        self.engine, self.ema, self.device = engine, ema, device
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator(device=device)
        self.grad_norm: torch.Tensor | None = None  # stage 0 only, measured on request

    def __call__(self, step: int, batches: list[dict[str, Any]], measure_norm: bool = False) -> list[Any]:
        """Run one optimizer step. `measure_norm`: keep the gradient norm (a device tensor) where
        DeepSpeed does not compute one itself (ZeRO stage 0 without clipping)."""
        outs = []
        for i, batch in enumerate(batches):
            self.generator.manual_seed(mask_seed(self.seed, step, self.rank, i))
            out = SimpleNamespace(**self.engine(to_device(batch, self.device), generator=self.generator))
            self.engine.backward(out.loss)
            if measure_norm and i == len(batches) - 1 and self.engine.zero_optimization_stage() == 0:
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                self.grad_norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g) for g in grads])
                )
            self.engine.step()
            outs.append(out)
        if self.ema is not None:
            self.ema.update()
        return outs


class StopSignal:
    """SIGINT/SIGTERM set a flag instead of killing the process (main thread of a plain process only)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def batch_counts(batch: dict[str, Any], tokens_per_sample: int) -> tuple[int, int]:
    """Samples and tokens of a loader batch, from its host-side metadata: a packed batch counts
    the tokens it holds (`cu_seqlens`), a padded one `tokens_per_sample` (`maestro info`) each."""
    samples = len(batch["_keys"])
    if "cu_seqlens" in batch:
        return samples, int(batch["cu_seqlens"][-1])
    return samples, samples * tokens_per_sample


def training_flops_per_sample(cfg: Config) -> float:
    """Training FLOPs per sample: 3 × the forward FLOPs of `maestro info` (forward and backward)."""
    from maestro.model.flops import flops_per_sample

    return 3.0 * float(flops_per_sample(cfg)["total"])


def skip_reasons(loader: Any) -> dict[str, int]:
    """This rank's skipped samples by reason, where the loader counts reasons; otherwise its
    total under the one reason it counts (samples unreadable as stored)."""
    if hasattr(loader, "skipped_reasons"):
        return dict(loader.skipped_reasons())
    total = loader.skipped_samples()
    return {"unreadable": total} if total else {}


class Trainer:
    """One rank's training state: engine, EMA, shard stream, checkpoints, and (rank 0) TensorBoard."""

    def __init__(
        self,
        cfg: Config,
        place: dist.Dist,
        on_step: Callable[[int, Any, list], None] | None,
        notice: Callable[[], str | None] | None = None,
        probe: Probe | None = None,
    ):
        from maestro.data import build_loader
        from maestro.info import tokens
        from maestro.model import build_model

        self.place, self.on_step, self.notice, self.probe = place, on_step, notice, probe
        self.noticed = False  # a preemption notice has been said
        self.url = run_url(cfg)
        self.store = checkpoint.CheckpointStore(self.url, cfg.train.keep_checkpoints)
        # Decided before anything of the run is written: a refused resume leaves the run as it was.
        self.resume_from = resume.plan(cfg, self.store, place.rank, place.world_size)
        stage = None if self.resume_from is None else self.resume_from.stage
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg)
        optimizer = optim.build_optimizer(cfg, model)
        schedule = optim.build_schedule(cfg, optimizer)
        use_gpu = place.device.type == "cuda"
        self.engine = build_engine(
            cfg,
            model,
            optimizer,
            schedule,
            place.world_size,
            use_gpu,
            stage,
            self.resume_from is not None and self.resume_from.universal,
        )
        # The saved config says what runs: the stage kept by a resume, this world's batch.
        self.cfg = copy.deepcopy(cfg)
        self.cfg.derived.deepspeed = config.deepspeed_config(cfg, place.world_size, use_gpu, stage)
        self.cfg.derived.global_batch = self.engine.train_batch_size()
        self.running = resume.running(self.engine, place.world_size)
        # The global batch is the run's at every world size: the accumulation makes up the rest.
        self.accum = self.engine.gradient_accumulation_steps()
        self.ema = EMA(local_shards(self.engine.module), cfg.train.ema_momentum) if cfg.train.ema else None
        self.loader = build_loader(cfg, place.rank, place.world_size, train=True)
        self.stepper = Stepper(self.engine, self.ema, place.device, cfg.train.seed, place.rank)
        self.names = ["loss", *cfg.derived.modalities]
        self.interval = metrics.Interval(self.names, place.device)
        self.tokens_per_sample = tokens(cfg)["total"]
        # Packed batches hold a varying number of tokens: FLOPs are counted per token.
        self.flops_per_token = training_flops_per_sample(cfg) / self.tokens_per_sample
        self.samples_trained = 0  # by this process's run, all ranks (a resumed run counts from its start)
        self.peak = metrics.peak_flops(place.device) * place.world_size
        self.fs, self.root = storage.url_to_fs(self.url)
        # Checkpoints written in the background (every rank makes the writer's group at once).
        self.writer = checkpoint.BackgroundWriter() if cfg.train.checkpoint_async else None
        self.stalls: list[float] = []  # seconds each checkpoint held training
        self.board: metrics.Board | None = None
        self.tb_dir = f"{self.root}/tensorboard"
        if place.is_main:
            for note in () if self.resume_from is None else self.resume_from.notes:
                console(note)
            console(
                f"{place.world_size} worker(s) × {self.accum} micro-batch(es) of {cfg.data.batch_size}: "
                f"global batch {self.running['global_batch']}"
            )
            if self.store.local:
                self.fs.makedirs(self.root, exist_ok=True)
            # On S3 the event files are written to a temporary local folder (removed at close)
            # and copied up at each flush.
            self.board = metrics.Board(self.tb_dir if self.store.local else None)
            self.tb_dir = self.board.log_dir
            self.board.writer.add_text("run/what_runs", json.dumps(self.running))
            self.fs.pipe_file(f"{self.root}/config.yaml", config.dump(self.cfg).encode())

    # --- checkpoints -------------------------------------------------------------------------

    def save(self, step: int) -> None:
        """Checkpoint `step` (every rank). In the background with `train.checkpoint_async`: the
        state is copied to host memory and training goes on while the writer writes it (the save
        after waits for it); `stalls` keeps the seconds each save held training."""
        t = time.perf_counter()
        r, stage = self.place.rank, self.engine.zero_optimization_stage()
        files: dict[str, Any] = {f"rank{r}_data.pt": self.loader.state_dict()}
        run_files: dict[str, Any] = {
            "state.json": json.dumps(
                {
                    "step": step,
                    "world_size": self.place.world_size,
                    "zero_stage": stage,
                    "steps": self.cfg.train.steps,
                }
            ).encode(),
            "config.yaml": config.dump(self.cfg).encode(),
            "version.json": json.dumps(checkpoint.code_version()).encode(),
        }
        if self.ema is not None:
            owner = files if stage == 3 else run_files
            owner[resume.ema_name(stage, r)] = self.ema.state_dict()
        self.store.save(step, self.engine, r, files, run_files, self.writer)
        self.stalls.append(time.perf_counter() - t)
        self.sync_board()

    def finish_writes(self) -> None:
        """Wait for the checkpoint in the background, if any (raises its failure, every rank)."""
        if self.writer is not None:
            self.writer.wait()

    def restore(self) -> int:
        """Load the checkpoint the resume plan chose, if any; return its step (0 for a fresh run)."""
        p = self.resume_from
        if p is None:
            return 0
        resume.restore(
            self.store, p, self.engine, self.loader, self.ema, self.place.rank, self.place.world_size
        )
        if self.place.is_main:
            console(f"resumed from {self.url}/{checkpoint.tag(p.step)} (step {p.step})")
        return p.step

    def sync_board(self) -> None:
        """Flush TensorBoard; for remote runs copy the event files to `RUN/tensorboard`."""
        if self.board is None:
            return
        self.board.flush()
        if not self.store.local:
            self.fs.put(f"{self.tb_dir}/", f"{self.root}/tensorboard/", recursive=True)

    def stop_file_present(self) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(f"{self.root}/{STOP_FILE}")

    # --- the loop ------------------------------------------------------------------------------

    def log(self, step: int, reduced: dict, lr: float, seconds: float, steps: int, data_wait: float) -> None:
        losses = reduced["losses"]
        sps = reduced["samples"] / seconds
        tps = reduced["tokens"] / seconds
        values = {"train/loss": losses["loss"]}
        values.update({f"train/loss/{m}": losses[m] for m in self.names[1:]})
        values["train/lr"] = lr
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self.stepper.grad_norm
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        values.update(
            {
                "perf/samples_per_s": sps,
                "perf/tokens_per_s": tps,
                "perf/data_wait_frac": data_wait / seconds,
                "perf/step_time_s": seconds / steps,
                "mem/peak_gb": metrics.peak_memory_gb(self.place.device),
                "data/skipped_samples": reduced["skipped"],
                "run/workers": self.running["workers"],
                "run/zero_stage": self.running["stage"],
                "train/global_batch": self.running["global_batch"],
            }
        )
        if self.peak:
            values["perf/mfu"] = tps * self.flops_per_token / self.peak
        if self.probe is not None and self.cfg.eval.every and step % self.cfg.eval.every == 0:
            # rank 0's in-loop probe (`maestro.eval.inloop.probe_scores`, passed in by the launcher)
            values.update(self.probe(self.cfg, self.engine.module.model, self.place.device))
        assert self.board is not None
        self.board.scalars(step, values)
        console(metrics.progress_line(step, self.cfg.train.steps, losses["loss"], sps, seconds / steps))

    def images(self, step: int, out: Any, batch: dict[str, Any]) -> None:
        assert self.board is not None
        for m, spec in self.cfg.derived.modalities.items():
            image, caption = metrics.sample_panel(m, spec, self.cfg.loss.target_norm, out, batch)
            self.board.image(step, f"images/{m}", image, caption)

    def run(self, stop: StopSignal) -> dict[str, Any]:
        c = self.cfg.train
        start = step = self.restore()
        batches = iter(self.loader)
        last_log, last_time, data_wait = step, time.perf_counter(), 0.0
        stopped, loss = False, float("nan")
        while step < c.steps and not stopped:
            micro = []
            for _ in range(self.accum):
                t = time.perf_counter()
                micro.append(next(batches))
                data_wait += time.perf_counter() - t
                self.interval.count(*batch_counts(micro[-1], self.tokens_per_sample))
            lr = self.engine.get_lr()[0]  # a host float: the learning rate this step uses
            log_step = reports(step + 1, c)
            outs = self.stepper(step, micro, measure_norm=log_step)
            step += 1
            for out in outs:
                self.interval.add(step, [out.loss, *(out.loss_per_modality[m] for m in self.names[1:])])
            if self.board is not None and step % c.image_every == 0:
                self.images(step, outs[-1], micro[-1])
            if self.on_step is not None:
                self.on_step(step, self.engine, micro)
            if not log_step:
                continue
            wants_stop = stop.requested or (self.place.is_main and self.stop_file_present())
            reduced = self.interval.reduce(self.loader.skipped_samples(), wants_stop)
            if reduced["first_bad_step"] is not None:
                self.sync_board()
                raise Diverged(
                    f"non-finite loss at step {reduced['first_bad_step']} in {', '.join(reduced['nonfinite'])} "
                    f"of run {self.url}; the last good checkpoint is {self._last_checkpoint()}. Lower "
                    "optim.base_lr or check the data (maestro shards inspect), then rerun to resume from it"
                )
            now = time.perf_counter()
            loss = reduced["losses"]["loss"]
            self.samples_trained += reduced["samples"]
            if self.board is not None:
                self.log(step, reduced, lr, now - last_time, step - last_log, data_wait)
            last_log, last_time, data_wait = step, now, 0.0
            stopped = reduced["stop"]
            noticed = self.preempted(step)
            if step % c.checkpoint_every == 0 or step == c.steps or stopped or noticed:
                self.save(step)
                if noticed:  # the node may go before the next log step: this one must be complete
                    self.finish_writes()
        self.finish_writes()
        self.sync_board()
        return {
            "step": step,
            "start_step": start,
            "loss": loss,
            "samples": self.samples_trained,
            "stopped": stopped,
            "run": self.url,
            "skipped": self.skip_summary(),
            **self.running,
        }

    def preempted(self, step: int) -> bool:
        """Whether a preemption notice stands (polled on every rank at each log step). Training
        goes on until the node goes, with a checkpoint at each log step meanwhile, each complete
        before training goes on: the work lost to the preemption is at most one log interval."""
        notice = None if self.notice is None else self.notice()
        if notice is None:
            return False
        if self.place.is_main and not self.noticed:
            console(
                f"preemption notice: {notice}; checkpoint at step {step} and at each log step until it goes"
            )
        self.noticed = True
        return True

    def skip_summary(self) -> dict[str, Any]:
        """`{"total", "reasons"}` of the samples skipped by all ranks (every rank calls this)."""
        parts: list[Any] = [None] * self.place.world_size
        torch.distributed.all_gather_object(parts, skip_reasons(self.loader))
        reasons: dict[str, int] = {}
        for part in parts:
            for reason, n in part.items():
                reasons[reason] = reasons.get(reason, 0) + n
        return {"total": sum(reasons.values()), "reasons": reasons}

    def _last_checkpoint(self) -> str:
        latest = self.store.latest()
        return "none" if latest is None else f"{self.url}/{checkpoint.tag(latest)}"

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.place.is_main:
            self.fs.pipe_file(f"{self.root}/{SUMMARY_FILE}", json.dumps(summary).encode())

    def close(self) -> None:
        """Wait for a checkpoint still being written (a failure is said: an error is already on
        its way out when the run did not reach `finish_writes`), then close TensorBoard."""
        try:
            self.finish_writes()
        except CheckpointError as e:
            console(str(e))
        if self.board is not None:
            self.board.close()


def train(
    cfg: Config,
    on_step: Callable[[int, Any, list], None] | None = None,
    notice: Callable[[], str | None] | None = None,
    probe: Probe | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run of `cfg` on this process's rank; returns a summary on every rank.

    Rank 0 also writes the summary to `RUN/summary.json` (how the Ray driver learns the outcome).
    `on_step(step, engine, batches)` runs after each optimizer step with its micro-batches (fault
    injection and sample accounting in tests).
    `notice()`: a coming preemption in one line, or None; called on every rank at each log step
    (the launcher's asks Ray Train); while a notice stands, every log step writes a checkpoint.
    `probe(cfg, model, device) -> {name: value}` runs on rank 0 every `eval.every` steps
    (the in-loop downstream probe; the training layer does not import the evaluation one).
    """
    place = dist.init(config.uses_gpu(cfg))
    try:
        trainer = Trainer(cfg, place, on_step, notice, probe)
        try:
            with StopSignal() as stop:
                summary = trainer.run(stop)
        except Diverged as e:
            trainer.write_summary({"diverged": str(e)})
            raise
        finally:
            trainer.close()
        trainer.write_summary(summary)
        return summary
    finally:
        dist.shutdown()
