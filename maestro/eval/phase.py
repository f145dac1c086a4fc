"""The probe and fine-tune phases (maestro_reference.md §1.9, §5): one function for a Ray Train
worker and for a plain process, on the pretraining's engine path.

A phase runs as a run of its own, `RUN/PHASE` (`run.storage = RUN`, `run.name = PHASE`, config
from `phase_config`): the model is built with the heads of `data.targets`, its weights come from
`model.init` (`maestro.eval.weights`), and a DeepSpeed engine (the pretraining's `build_engine`,
optimizer, one-cycle schedule and `Stepper`) trains it on the labelled training stream.

- `probe`: the encoder is frozen and only the heads learn (the reference detaches the features,
  so its AdamW skips the encoder); the reference's probe recipe (`eval.probe_*`: base lr 1e-5,
  final factor 1e7).
- `finetune`: the encoder and the heads learn (the probe's head carried over: by default it
  starts from `RUN/probe/best.safetensors`), with the reference's fine-tune schedule (base lr
  1e-5, the lr ending at lr/2); validation and test use the EMA weights, updated at every
  validation (the reference's once per epoch) with its momentum `1 − 1/(0.2·validations)`;
  early stopping after `eval.patience` validations without a better monitored metric.
  Pretraining-only parts (decoder, mask tokens, pixel heads) take no part and are not optimized.

Every `eval.val_every` steps the phase scores `eval.val`; the best validation's weights (EMA ones
in fine-tuning) are kept, written to `RUN/PHASE/best.safetensors`, and scored on `eval.val` and
`eval.test` (the reference tests on its best checkpoint). Metrics go to TensorBoard
(`RUN/PHASE/tensorboard`, tags `eval/PHASE/SPLIT_METRIC`) and `RUN/PHASE/results.json`.

Checkpoints and resume are pretraining's (`maestro.train.checkpoint`, `maestro.train.resume`):
every validation writes `RUN/PHASE/checkpoint_STEP/` (engine state with heads, encoder, optimizer
and schedule; the data stream; the EMA; `phase.pt`, the early-stopping state: best metric, its
step, the validations since, whether it stopped, and the best weights of the trained parameters),
complete only once its digests and marker are written; a rerun of the same phase resumes from the
newest one that verifies, under a config `resume.compare` accepts (`changeable`: the pretraining
rules, where the `eval` keys the phase runs with cannot change). A phase with a results file is
complete: a rerun says so and keeps it (`finished`).

ZeRO-3 is not used: `phase_config` caps the stage at 2, and the banner, the saved config and the
results (`what_runs`) say the stage that runs. Under ZeRO-3 every forward gathers parameters
collectively, so all ranks must run the same number of forwards, while a deterministic,
complete evaluation pass gives ranks unequal shares of a split; the best weights, the EMA and
`best.safetensors` would need gathering too. A phase's parameters (at most `large`, 0.9 B,
1.8 GB in bf16) fit on every rank; ZeRO-2 still partitions the gradients and optimizer state.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from maestro import config, storage
from maestro.config import Config
from maestro.eval.data import SPLITS, Pass, split_url, train_stream
from maestro.eval.tasks import build_metric, default_monitor, task_loss, update_metric
from maestro.eval.weights import check_init, load_init, save_weights
from maestro.model.ema import EMA, reference_momentum
from maestro.parallel import dist
from maestro.parallel.deepspeed import build_engine, local_shards
from maestro.train import checkpoint, optim, resume
from maestro.train import metrics as train_metrics
from maestro.train.loop import SUMMARY_FILE, Stepper, console, run_url, to_device

PHASES = ("probe", "finetune")
RESULTS = "results.json"
BEST = "best.safetensors"
PRETRAIN_ONLY = ("decoder", "enc_to_dec", "embed_to_rec", "mask_token")
PHASE_STATE = "phase.pt"  # a checkpoint's early-stopping state and best weights
MAX_STAGE = 2  # the ZeRO stage phases run at most (see the module docstring)


@dataclass
class TaskOutput:
    loss: Tensor  # the targets' losses summed
    logits: dict[str, Tensor]


class TaskModel(nn.Module):
    """The model's downstream forward, as the engine runs it: every head's logits and the loss."""

    def __init__(self, model: nn.Module, frozen: bool):
        super().__init__()
        self.model, self.frozen = model, frozen
        self.targets = dict(model.cfg.derived.targets)

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> TaskOutput:
        logits = self.model.predict(batch, frozen=self.frozen)
        loss = sum(task_loss(spec, logits[n], batch[n]) for n, spec in self.targets.items())
        return TaskOutput(loss, logits)


def trainable(model: nn.Module, phase: str) -> None:
    """Probe: the heads only; fine-tune: everything but the pretraining-only parts."""
    for name, p in model.named_parameters():
        part = name.split(".", 1)[0]
        p.requires_grad_(part == "heads" if phase == "probe" else part not in PRETRAIN_ONLY)


def default_init(cfg: Config, phase: str) -> str:
    """`model.init`, or the run's own weights: the probe's best for fine-tuning when it exists,
    else the pretraining run's newest checkpoint."""
    init = cfg.model.init
    if init:
        return init if init == "random" else storage.absolute(init)
    run = run_url(cfg)
    best = storage.join(run, "probe", BEST)
    if phase == "finetune" and storage.exists(best):
        return best
    return run


def phase_config(cfg: Config, phase: str) -> Config:
    """The config the phase runs: its steps and learning-rate recipe, its run folder `RUN/PHASE`,
    its weights and splits resolved to absolute URLs."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    ev = cfg.eval
    probe = phase == "probe"
    raw = {k: v for k, v in cfg.to_dict().items() if k != "derived"}
    steps = ev.probe_steps if probe else ev.finetune_steps
    # At most ZeRO-2 (see the module docstring); a checkpoint at every validation.
    raw["train"].update(
        steps=steps, checkpoint_every=ev.val_every, zero_stage=min(cfg.train.zero_stage, MAX_STAGE)
    )
    raw["optim"].update(
        base_lr=ev.probe_base_lr if probe else ev.finetune_base_lr,
        final_factor=ev.probe_final_factor if probe else ev.finetune_final_factor,
    )
    raw["model"]["init"] = default_init(cfg, phase)
    check_init(raw["model"]["init"])
    raw["eval"].update({s: storage.absolute(split_url(cfg, s)) for s in SPLITS})
    raw["run"].update(storage=run_url(cfg), name=phase)
    return config.from_dict(raw)


def changeable(phase: str) -> tuple[str, ...]:
    """The config keys a resumed phase may change: pretraining's, but of the `eval` section only
    those the phase does not run with (the in-loop probe's, the other phase's recipe; `patience`
    for the probe, which never stops early)."""
    other = "finetune" if phase == "probe" else "probe"
    own = tuple(k for k in resume.CHANGEABLE if k != "eval.")
    return (
        *own,
        "eval.every",
        "eval.probe_samples",
        f"eval.{other}_",
        *(("eval.patience",) if phase == "probe" else ()),
    )


def finished(cfg: Config, phase: str) -> dict[str, Any] | None:
    """The results of phase config `cfg` when the phase is complete (its results file exists),
    else None. Raises `CheckpointError` when `cfg` differs from the config the phase ran with in a
    way a resume refuses (`resume.compare`)."""
    url = run_url(cfg)
    done = storage.join(url, RESULTS)
    if not storage.exists(done):
        return None
    resume.check_config(cfg, url, changeable(phase))
    return json.loads(storage.read_bytes(done))


def _finite_better(new: float, old: float) -> bool:
    return not math.isnan(new) and (math.isnan(old) or new > old)


class PhaseRun:
    """One rank's phase: engine, EMA (fine-tune), validation, best weights, results."""

    def __init__(
        self,
        cfg: Config,
        phase: str,
        place: dist.Dist,
        on_step: Callable[[int, Any], None] | None = None,
    ):
        from maestro.model import build_model

        self.phase, self.place, self.on_step = phase, place, on_step
        self.url = run_url(cfg)
        self.store = checkpoint.CheckpointStore(self.url, cfg.train.keep_checkpoints)
        # Decided before anything of the phase is written: a refused resume leaves it as it was.
        self.resume_from = resume.plan(cfg, self.store, place.rank, place.world_size, changeable(phase))
        stage = None if self.resume_from is None else self.resume_from.stage
        self.targets = dict(cfg.derived.targets)
        self.first = next(iter(self.targets))
        self.monitor = cfg.eval.monitor or default_monitor(self.targets[self.first])
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg)
        self.set_aside = load_init(model, cfg.model.init)
        trainable(model, phase)
        self.task = TaskModel(model, frozen=phase == "probe")
        optimizer = optim.build_optimizer(cfg, self.task)
        schedule = optim.build_schedule(cfg, optimizer)
        gpu = place.device.type == "cuda"
        universal = self.resume_from is not None and self.resume_from.universal
        self.engine = build_engine(
            cfg, self.task, optimizer, schedule, place.world_size, gpu, stage, universal
        )
        # The saved config says what runs: the stage kept by a resume, this world's batch.
        self.cfg = copy.deepcopy(cfg)
        self.cfg.derived.deepspeed = config.deepspeed_config(cfg, place.world_size, gpu, stage)
        self.cfg.derived.global_batch = self.engine.train_batch_size()
        self.running = resume.running(self.engine, place.world_size)
        self.loader = train_stream(cfg, place.rank, place.world_size)
        self.stepper = Stepper(self.engine, None, place.device, cfg.train.seed, place.rank)
        self.params = local_shards(self.engine.module)
        # The parameters the phase trains: the only ones whose best weights differ from the others'.
        self.trained = [p.requires_grad for p in self.engine.module.parameters()]
        validations = math.ceil(cfg.train.steps / cfg.eval.val_every)
        use_ema = phase == "finetune" and cfg.train.ema
        # The reference's momentum needs 5+ updates to be positive; below that the EMA is the weights.
        momentum = max(0.0, reference_momentum(validations)) if validations >= 5 else 0.0
        self.ema = EMA(self.params, momentum) if use_ema else None
        self.fs, self.root = storage.url_to_fs(self.url)
        self.board: train_metrics.Board | None = None
        if place.is_main:
            for note in () if self.resume_from is None else self.resume_from.notes:
                console(note)
            local = not storage.is_s3(self.url)
            if local:
                self.fs.makedirs(self.root, exist_ok=True)
            self.tb_dir = f"{self.root}/tensorboard" if local else tempfile.mkdtemp(prefix="maestro-tb-")
            self.board = train_metrics.Board(self.tb_dir)
            self.board.writer.add_text("run/what_runs", json.dumps(self.running))
            self.fs.pipe_file(f"{self.root}/config.yaml", config.dump(self.cfg).encode())

    # --- checkpoints -------------------------------------------------------------------------

    def save(self, step: int, early: dict[str, Any]) -> None:
        """Checkpoint `step` (a validation step; every rank calls this): pretraining's files and
        the early-stopping state `early` with the best weights."""
        r, stage = self.place.rank, self.engine.zero_optimization_stage()
        files = {f"rank{r}_data.pt": checkpoint.encode(self.loader.state_dict())}
        state = {
            "step": step,
            "world_size": self.place.world_size,
            "zero_stage": stage,
            "steps": self.cfg.train.steps,
            "phase": self.phase,
        }
        run_files = {
            "state.json": json.dumps(state).encode(),
            "config.yaml": config.dump(self.cfg).encode(),
            "version.json": json.dumps(checkpoint.code_version()).encode(),
            PHASE_STATE: checkpoint.encode(early),
        }
        if self.ema is not None:
            run_files[resume.ema_name(stage, r)] = checkpoint.encode(self.ema.state_dict())
        self.store.save(step, self.engine, r, files, run_files)
        self.sync_board()

    def sync_board(self) -> None:
        """Flush TensorBoard; for remote runs copy the event files to `RUN/PHASE/tensorboard`."""
        if self.board is None:
            return
        self.board.flush()
        if storage.is_s3(self.url):
            self.fs.put(f"{self.tb_dir}/", f"{self.root}/tensorboard/", recursive=True)

    def restore(self) -> tuple[int, dict[str, Any] | None]:
        """Load the checkpoint the resume plan chose, if any: its step (0 for a fresh phase) and
        its early-stopping state."""
        p = self.resume_from
        if p is None:
            return 0, None
        resume.restore(
            self.store, p, self.engine, self.loader, self.ema, self.place.rank, self.place.world_size
        )
        early = checkpoint.decode(self.store.read(p.step, PHASE_STATE))
        if self.place.is_main:
            console(
                f"{self.phase}: resumed from {self.url}/{checkpoint.tag(p.step)} (step {p.step}, best "
                f"{self.monitor} {early['best_score']:.4f} at step {early['best_step']})"
            )
        return p.step, early

    def _best(self) -> list[Tensor]:
        """Copies of the trained parameters (this rank's parts)."""
        return [p.detach().clone() for p, t in zip(self.params, self.trained) if t]

    def _set_best(self, best: list[Tensor]) -> None:
        with torch.no_grad():
            for p, b in zip((p for p, t in zip(self.params, self.trained) if t), best, strict=True):
                p.copy_(b)

    @contextlib.contextmanager
    def eval_weights(self) -> Iterator[None]:
        """Within the block the model holds the weights validation uses (the EMA in fine-tuning)."""
        if self.ema is None:
            yield
            return
        saved = [p.detach().clone() for p in self.params]
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            for p, s in zip(self.params, saved):
                p.copy_(s)

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, dict[str, float]]:
        """Metrics of every target on one deterministic pass over a split, summed over ranks."""
        p = self.place
        scores = {n: build_metric(s, p.device) for n, s in self.targets.items()}
        self.engine.eval()
        for batch in Pass(self.cfg, split_url(self.cfg, split), p.rank, p.world_size).batches():
            b = to_device(batch, p.device)
            out = self.engine(b)
            for n, spec in self.targets.items():
                update_metric(scores[n], spec, out["logits"][n].float(), b[n])
        self.engine.train()
        for m in scores.values():
            m.reduce()
        return {n: m.compute() for n, m in scores.items()}

    def log(self, step: int, split: str, results: dict[str, dict[str, float]]) -> None:
        if self.board is None:
            return
        values = {}
        for n, res in results.items():
            prefix = f"eval/{self.phase}/{split}_" if n == self.first else f"eval/{self.phase}/{n}/{split}_"
            values.update({prefix + k: v for k, v in res.items()})
        self.board.scalars(step, values)

    def _mean_loss(self, losses: list[Tensor]) -> float:
        total = torch.stack(losses).float().sum().reshape(1)
        count = torch.tensor([float(len(losses))], device=total.device)
        both = torch.cat([total, count])
        torch.distributed.all_reduce(both)
        return float(both[0] / both[1])

    def run(self) -> dict[str, Any]:
        c, ev = self.cfg.train, self.cfg.eval
        step, early = self.restore()
        if early is None:
            early = {"best_score": math.nan, "best_step": 0, "bad": 0, "stopped": False, "best": None}
        stream = iter(self.loader)
        losses: list[Tensor] = []
        while step < c.steps and not early["stopped"]:
            outs = self.stepper(step, [next(stream) for _ in range(c.grad_accum)])
            step += 1
            if self.on_step is not None:
                self.on_step(step, self.engine)
            losses.extend(o.loss.detach() for o in outs)
            if step % ev.val_every and step != c.steps:
                continue
            if self.ema is not None:
                self.ema.update()
            loss = self._mean_loss(losses)
            losses = []
            with self.eval_weights():
                val = self.evaluate("val")
                score = val[self.first][self.monitor]
                if early["best"] is None or _finite_better(score, early["best_score"]):
                    early.update(best=self._best(), best_score=score, best_step=step, bad=0)
                else:
                    early["bad"] += 1
            if self.board is not None:
                self.board.scalars(step, {f"eval/{self.phase}/train_loss": loss})
            self.log(step, "val", val)
            if self.place.is_main:
                console(
                    f"{self.phase} step {step}/{c.steps}: loss {loss:.4f}, val {self.monitor} {score:.4f} "
                    f"(best {early['best_score']:.4f} at step {early['best_step']})"
                )
            early["stopped"] = self.phase == "finetune" and bool(ev.patience) and early["bad"] >= ev.patience
            self.save(step, early)
        assert early["best"] is not None  # the last step always validates
        self._set_best(early["best"])
        best_step, stopped_early = early["best_step"], early["stopped"]
        final = {s: self.evaluate(s) for s in ("val", "test")}
        self.log(best_step, "test", final["test"])
        results = {
            "phase": self.phase,
            "init": self.cfg.model.init,
            "target": self.first,
            "monitor": self.monitor,
            "best_step": best_step,
            "steps": step,
            "stopped_early": stopped_early,
            **{s: final[s][self.first] for s in final},
            "targets": {n: {s: final[s][n] for s in final} for n in self.targets},
            "set_aside": self.set_aside,
            "run": self.url,
            "what_runs": self.running,
        }
        if self.place.is_main:
            save_weights(self.task.model, f"{self.url}/{BEST}")
            data = json.dumps(results, indent=1).encode()
            self.fs.pipe_file(f"{self.root}/{RESULTS}", data)
            self.fs.pipe_file(f"{self.root}/{SUMMARY_FILE}", data)
            console(
                f"{self.phase}: test {self.monitor} {results['test'][self.monitor]:.4f} -> {self.url}/{RESULTS}"
            )
        return results

    def close(self) -> None:
        self.sync_board()
        if self.board is not None:
            self.board.close()


def run_phase(cfg: Config, phase: str, on_step: Callable[[int, Any], None] | None = None) -> dict[str, Any]:
    """Run (or resume) phase `phase` of a phase config (`phase_config`) on this process's rank;
    a complete phase is not run again (its results are returned). `on_step(step, engine)` runs
    after each optimizer step (fault injection in tests)."""
    done = finished(cfg, phase)
    if done is not None:
        console(f"{phase}: already done ({run_url(cfg)}/{RESULTS})")
        return done
    place = dist.init(config.uses_gpu(cfg))
    try:
        job = PhaseRun(cfg, phase, place, on_step)
        try:
            return job.run()
        finally:
            job.close()
    finally:
        dist.shutdown()


def worker_entry(loop_config: dict[str, Any], phase: str) -> None:
    """The Ray Train worker function of a phase (`cluster.launch.launch(cfg, train_fn=...)`)."""
    run_phase(config.from_dict(loop_config["config"]), phase)
