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
(`RUN/PHASE/tensorboard`, tags `eval/PHASE/SPLIT_METRIC`) and `RUN/PHASE/results.json`. A phase
with a results file is complete; an interrupted phase starts again from its init (phases are
short next to pretraining).
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
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
from maestro.train import metrics as train_metrics
from maestro.train import optim
from maestro.train.loop import SUMMARY_FILE, Stepper, console, run_url, to_device

PHASES = ("probe", "finetune")
RESULTS = "results.json"
BEST = "best.safetensors"
PRETRAIN_ONLY = ("decoder", "enc_to_dec", "embed_to_rec", "mask_token")


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
    # ZeRO-3 would gather parameters collectively in every forward, and ranks score unequal shares
    # of a split; heads and a fine-tuned encoder fit in ZeRO-2.
    raw["train"].update(steps=steps, checkpoint_every=steps, zero_stage=min(cfg.train.zero_stage, 2))
    raw["optim"].update(
        base_lr=ev.probe_base_lr if probe else ev.finetune_base_lr,
        final_factor=ev.probe_final_factor if probe else ev.finetune_final_factor,
    )
    raw["model"]["init"] = default_init(cfg, phase)
    check_init(raw["model"]["init"])
    raw["eval"].update({s: storage.absolute(split_url(cfg, s)) for s in SPLITS})
    raw["run"].update(storage=run_url(cfg), name=phase)
    return config.from_dict(raw)


def _finite_better(new: float, old: float) -> bool:
    return not math.isnan(new) and (math.isnan(old) or new > old)


class PhaseRun:
    """One rank's phase: engine, EMA (fine-tune), validation, best weights, results."""

    def __init__(self, cfg: Config, phase: str, place: dist.Dist):
        from maestro.model import build_model

        self.cfg, self.phase, self.place = cfg, phase, place
        self.url = run_url(cfg)
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
        self.engine = build_engine(cfg, self.task, optimizer, schedule, place.world_size, gpu)
        self.stepper = Stepper(self.engine, None, place.device, cfg.train.seed, place.rank)
        self.params = local_shards(self.engine.module)
        validations = math.ceil(cfg.train.steps / cfg.eval.val_every)
        use_ema = phase == "finetune" and cfg.train.ema
        # The reference's momentum needs 5+ updates to be positive; below that the EMA is the weights.
        momentum = max(0.0, reference_momentum(validations)) if validations >= 5 else 0.0
        self.ema = EMA(self.params, momentum) if use_ema else None
        self.fs, self.root = storage.url_to_fs(self.url)
        self.board: train_metrics.Board | None = None
        if place.is_main:
            local = not storage.is_s3(self.url)
            if local:
                self.fs.makedirs(self.root, exist_ok=True)
            self.tb_dir = f"{self.root}/tensorboard" if local else tempfile.mkdtemp(prefix="maestro-tb-")
            self.board = train_metrics.Board(self.tb_dir)
            self.fs.pipe_file(f"{self.root}/config.yaml", config.dump(cfg).encode())

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
        stream = iter(train_stream(self.cfg, self.place.rank, self.place.world_size))
        best_score, best_step, bad = math.nan, 0, 0
        best: list[Tensor] | None = None
        losses: list[Tensor] = []
        step, stopped_early = 0, False
        while step < c.steps:
            outs = self.stepper(step, [next(stream) for _ in range(c.grad_accum)])
            step += 1
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
                if best is None or _finite_better(score, best_score):
                    best = [p.detach().clone() for p in self.params]
                    best_score, best_step, bad = score, step, 0
                else:
                    bad += 1
            if self.board is not None:
                self.board.scalars(step, {f"eval/{self.phase}/train_loss": loss})
            self.log(step, "val", val)
            if self.place.is_main:
                console(
                    f"{self.phase} step {step}/{c.steps}: loss {loss:.4f}, val {self.monitor} {score:.4f} "
                    f"(best {best_score:.4f} at step {best_step})"
                )
            if self.phase == "finetune" and ev.patience and bad >= ev.patience:
                stopped_early = True
                break
        assert best is not None  # the last step always validates
        with torch.no_grad():
            for p, b in zip(self.params, best):
                p.copy_(b)
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
        if self.board is None:
            return
        self.board.close()
        if storage.is_s3(self.url):
            self.fs.put(f"{self.tb_dir}/", f"{self.root}/tensorboard/", recursive=True)


def run_phase(cfg: Config, phase: str) -> dict[str, Any]:
    """Run phase `phase` of a phase config (`phase_config`) on this process's rank."""
    place = dist.init(config.uses_gpu(cfg))
    try:
        job = PhaseRun(cfg, phase, place)
        try:
            return job.run()
        finally:
            job.close()
    finally:
        dist.shutdown()


def worker_entry(loop_config: dict[str, Any], phase: str) -> None:
    """The Ray Train worker function of a phase (`cluster.launch.launch(cfg, train_fn=...)`)."""
    run_phase(config.from_dict(loop_config["config"]), phase)
