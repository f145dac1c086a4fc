"""Optimizer recipe and precision paths, EMA, checkpoint store (local and S3), digests and metrics,
on a stand-in module in one process."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from maestro import config
from maestro.errors import CheckpointError
from maestro.model.ema import EMA
from maestro.parallel import dist
from maestro.parallel.deepspeed import (
    build_engine,
    expected_optimizer,
    local_shards,
    optimizer_name,
    precision,
    safe_load,
)
from maestro.train import checkpoint, metrics, optim


def _cfg(*overrides: str):
    return config.from_dict({}, ["run.use_gpu=false", "train.steps=100", *overrides])


@dataclass
class Out:
    loss: torch.Tensor


class StandIn(nn.Module):
    """Returns a dataclass, as the model does."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        x = x.to(self.lin.weight.dtype)  # as the model: fp32 in, cast to what it computes with
        return Out(self.norm(self.lin(x)).float().pow(2).mean())


@pytest.fixture
def one_rank(clean_group_env):
    """A one-rank gloo group in this process; the group's variables are removed afterwards."""
    place = dist.init(use_gpu=False)
    yield place
    dist.shutdown()


def test_one_cycle_schedule_and_adamw_follow_the_reference():
    cfg = _cfg("optim.base_lr=0.001", "data.batch_size=6", "run.workers=2")
    assert cfg.derived.lr == pytest.approx(1e-3 * math.sqrt(12 / 3))
    model = StandIn()
    opt = optim.build_optimizer(cfg, model)
    sched = optim.build_schedule(cfg, opt)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    assert opt.param_groups[0]["weight_decay"] == 0.01
    lrs = []
    for step in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if step < 99:
            sched.step()
    peak = cfg.derived.lr
    assert lrs[0] == pytest.approx(peak / 1000)
    assert max(lrs) == pytest.approx(peak, rel=1e-3) and lrs.index(max(lrs)) in (19, 20)
    assert lrs[-1] == pytest.approx(peak / 1e7, rel=1e-3)


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_one_cycle_schedule_where_warm_up_is_one_step(steps):
    """`optim.pct_start × train.steps == 1` (5 steps at the default 0.2): torch's OneCycleLR would
    divide 0 by 0 at step 0; the schedule has no warm-up (as shorter runs), the peak at step 0,
    then the cosine decay to the same end as any other."""
    cfg = _cfg(f"train.steps={steps}", f"optim.pct_start={1 / steps}")
    opt = optim.build_optimizer(cfg, StandIn())
    sched = optim.build_schedule(cfg, opt)
    lrs = []
    for step in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if step < steps - 1:
            sched.step()
    peak = cfg.derived.lr
    assert lrs[0] == pytest.approx(peak, rel=1e-6)
    assert lrs[-1] == pytest.approx(peak / 1e7, rel=1e-3)
    assert all(a > b for a, b in itertools.pairwise(lrs))  # cosine decay from the peak


def test_weight_decay_exclusions_leave_matrices_decayed():
    cfg = _cfg("optim.decay_norms_and_biases=false")
    groups = optim.parameter_groups(cfg, StandIn())
    assert [p.ndim for p in groups[0]["params"]] == [2]
    assert sorted(p.ndim for p in groups[1]["params"]) == [1, 1, 1] and groups[1]["weight_decay"] == 0.0


def test_ema_matches_hand_computed_average_and_round_trips():
    w = torch.tensor([1.0, 2.0])
    ema = EMA([w], momentum=0.9)
    w += 10.0
    ema.update()
    assert torch.allclose(ema.shadow[0], torch.tensor([1.0, 2.0]) * 0.9 + torch.tensor([11.0, 12.0]) * 0.1)
    other = EMA([torch.zeros(2)], momentum=0.9)
    other.load_state_dict(checkpoint.decode(checkpoint.encode(ema.state_dict())))
    assert torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(Exception, match="EMA state holds tensors of shapes"):
        EMA([torch.zeros(3)], 0.9).load_state_dict(ema.state_dict())


def _engine(seed: int, *overrides: str, stage: int | None = None):
    cfg = _cfg("train.zero_stage=2", "data.batch_size=4", "optim.base_lr=0.01", *overrides)
    torch.manual_seed(seed)
    model = StandIn()
    opt = optim.build_optimizer(cfg, model)
    return build_engine(
        cfg, model, opt, optim.build_schedule(cfg, opt), world_size=1, use_gpu=False, stage=stage
    )


def _train(engine, steps: int):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        out = engine(torch.randn(4, 6, generator=g))
        engine.backward(out["loss"])
        engine.step()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoint_store_marks_prunes_and_restores(where, one_rank, tmp_path, request):
    if where == "s3":
        url = f"s3://{request.getfixturevalue('s3_bucket')}/runs/r1"
    else:
        url = str(tmp_path / "runs" / "r1")
    store = checkpoint.CheckpointStore(url, keep=2)
    engine = _engine(seed=0)
    assert engine.zero_optimization_stage() == 0  # one rank: nothing to partition
    for step in (1, 2, 3):
        _train(engine, 1)
        store.save(step, engine, 0, {"rank0_data.pt": checkpoint.encode({"step": step})}, {"note": b"x"})
    assert store.complete_steps() == [2, 3]
    # A checkpoint cut short (no marker) is never the one resumed from, and is pruned later.
    store.fs.makedirs(f"{store.root}/{checkpoint.tag(9)}", exist_ok=True)
    store.fs.pipe_file(f"{store.root}/{checkpoint.tag(9)}/rank0_data.pt", b"partial")
    assert store.latest() == 3
    assert checkpoint.decode(store.read(3, "rank0_data.pt")) == {"step": 3}
    saved = [t.clone() for t in local_shards(engine.module)]
    lr = engine.get_lr()[0]
    fresh = _engine(seed=1)
    assert not torch.equal(local_shards(fresh.module)[0], saved[0])
    store.load(3, fresh, rank=0)
    assert all(torch.equal(a, b) for a, b in zip(local_shards(fresh.module), saved))
    assert fresh.get_lr()[0] == pytest.approx(lr)
    _train(engine, 1)
    _train(fresh, 1)  # the optimizer state came back too: the next step is identical
    assert all(torch.equal(a, b) for a, b in zip(local_shards(fresh.module), local_shards(engine.module)))
    store.save(4, engine, 0, {}, {"note": b"x"})
    assert store.complete_steps() == [3, 4]
    assert not store.fs.exists(f"{store.root}/{checkpoint.tag(9)}")
    with pytest.raises(Exception, match="missing from a checkpoint marked complete"):
        store.read(4, "rank0_data.pt")
    # Every file is listed with its digest; a changed byte, a missing file are named.
    listed = json.loads(store.read(4, checkpoint.DIGESTS))["files"]
    assert set(listed) == {"mp_rank_00_model_states.pt", "note"} and store.verify(4) is None
    path = f"{store.root}/{checkpoint.tag(4)}/note"
    store.fs.pipe_file(path, b"y")
    assert (
        store.verify(4)
        == "note does not match the sha256 recorded when it was written (changed or corrupted since)"
    )
    store.fs.rm(path)
    assert store.verify(4) == "note is missing"
    store.reject(4, "note is missing")
    assert store.complete_steps() == [3]
    store.save(5, engine, 0, {}, {})  # pruning keeps a rejected checkpoint for inspection
    assert store.complete_steps() == [3, 5] and store.fs.exists(f"{store.root}/{checkpoint.tag(4)}")


def test_interval_reduces_means_and_names_the_first_nonfinite_step(one_rank):
    iv = metrics.Interval(["loss", "s2"], one_rank.device)
    iv.add(1, [torch.tensor(2.0), torch.tensor(1.0)])
    iv.add(2, [torch.tensor(4.0), torch.tensor(3.0)])
    iv.count(3, 120)
    iv.count(2, 95)
    out = iv.reduce(skipped=5, stop=False)
    assert out["losses"] == {"loss": 3.0, "s2": 2.0}
    assert out["first_bad_step"] is None and out["skipped"] == 5 and not out["stop"]
    assert (out["samples"], out["tokens"]) == (5, 215)
    iv.add(3, [torch.tensor(1.0), torch.tensor(1.0)])
    iv.add(4, [torch.tensor(float("nan")), torch.tensor(float("inf"))])
    iv.add(5, [torch.tensor(float("nan")), torch.tensor(1.0)])
    out = iv.reduce(skipped=0, stop=True)
    assert (out["samples"], out["tokens"]) == (0, 0)  # counts start afresh each interval
    assert out["first_bad_step"] == 4 and out["nonfinite"] == ["loss", "s2"] and out["stop"]


def test_board_event_files_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = metrics.Board(tmp_path / "tb")
    board.scalars(3, {"train/loss": 0.5, "perf/mfu": 0.1})
    panel = metrics.reconstruction_panel(torch.rand(4, 8, 8), torch.rand(4, 8, 8), torch.rand(4, 8, 8) > 0.5)
    # 8-px rasters upscaled ×12 to MIN_SIDE: input, masked input, reconstruction side by side
    assert metrics.MIN_SIDE == 96 and panel.shape == (3, 96, 3 * 96 + 2 * 2)
    assert panel.min() >= 0 and panel.max() <= 1
    board.image(3, "images/aerial", panel)
    board.close()
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert acc.Scalars("train/loss")[0].value == pytest.approx(0.5)
    assert acc.Scalars("train/loss")[0].step == 3
    assert acc.Tags()["images"] == ["images/aerial"]


def test_progress_line():
    line = metrics.progress_line(10, 70, 0.25, 12.5, 2.0)
    assert line == "step 10/70  loss 0.2500  12.5 samples/s  ETA 0:02:00"
    assert metrics.measured_cpu_flops(seconds=0.05, n=64) > 1e6


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),  # not the SXM part whose name it contains
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A10G", 70e12),  # not the A10
        ("NVIDIA A10", 125e12),
        ("NVIDIA L40S", 362e12),  # not the L4
        ("NVIDIA L4", 121e12),
        ("NVIDIA GB200", 2.5e15),  # not the B200
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 2080", 0.0),  # unknown: MFU is not logged
    ],
)
def test_peak_flops_matches_the_most_specific_device_name(name, peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.peak_flops(torch.device("cuda", 0)) == peak


class _Payload:
    """Any class a hostile checkpoint could name to run code when unpickled."""


def test_deepspeed_checkpoints_load_weights_only_and_refuse_other_objects(tmp_path):
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, good)
    torch.save({"module": {"w": torch.ones(2)}, "evil": _Payload()}, bad)
    assert safe_load(str(good), "cpu")["step"] == 3
    with pytest.raises(CheckpointError, match="bad.pt: refused to load") as e:
        safe_load(str(bad), "cpu")
    message = str(e.value)
    assert "test_train_units._Payload" in message and "weights-only" in message  # what, and why
    assert "weights_only=False" not in message and "add_safe_globals" not in message
    assert "delete" not in message.lower() and "\n" not in message


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_steps_fp32_master_weights_without_deepspeed_unfused_optimizer(stage, one_rank):
    """bf16 at each ZeRO stage: the optimizer that runs is the one the README and the banner name,
    never DeepSpeed's unfused fp16-style optimizer (a Python loop with host syncs)."""
    engine = _engine(0, "train.precision=bf16", stage=stage)
    assert optimizer_name(engine) == expected_optimizer(stage, use_gpu=False)
    assert precision(engine) == "bf16" and "Unfused" not in type(engine.optimizer).__name__
    if stage == 0:  # fp32 weights stepped by torch's AdamW, bf16 compute under autocast
        assert engine.optimizer is engine.basic_optimizer
        assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    else:  # bf16 weights, fp32 master partitions in DeepSpeed's ZeRO optimizer
        assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
        masters = (
            engine.optimizer.fp32_partitioned_groups_flat
            if stage == 3
            else engine.optimizer.single_partition_of_fp32_groups
        )
        assert {t.dtype for t in masters} == {torch.float32}
    before = [t.detach().float().clone() for t in local_shards(engine.module)]
    _train(engine, 2)
    assert any(not torch.equal(a, b.detach().float()) for a, b in zip(before, local_shards(engine.module)))


def test_to_device_moves_inputs_as_they_are_and_keeps_host_keys_behind():
    """Targets and their statistics come from the loader's fp32 values: a near-flat DEM patch keeps
    its variance (rounded to bf16 both values would be 1000); the model casts what it computes with."""
    from maestro.train.loop import to_device

    dem = torch.tensor([[1000.0, 1000.01]])
    batch = {"dem": dem, "dem_dates": torch.ones(1, 3, dtype=torch.int64), "_keys": ["a"], "_skipped": 0}
    out = to_device(batch, torch.device("cpu"))
    assert set(out) == {"dem", "dem_dates"}
    assert out["dem"].dtype == torch.float32 and out["dem"].var() > 0
    assert torch.equal(out["dem"], dem) and out["dem_dates"].dtype == torch.int64
    # The per-sample date counts the model reads on the host stay there (no device-to-host copy
    # in every padded step); the arrays go to the device.
    batch["dem_ndates"] = torch.tensor([1])
    out = to_device(batch, torch.device("meta"))
    assert out["dem"].is_meta and out["dem_dates"].is_meta
    assert out["dem_ndates"].device.type == "cpu" and out["dem_ndates"].tolist() == [1]
