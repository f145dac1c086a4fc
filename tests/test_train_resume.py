"""Resuming a run: a changed config is refused or accepted key by key, and a run resumes at another
number of workers in both directions (real DeepSpeed on gloo; ranks as spawned processes over a
FileStore), including the demo's bf16 ZeRO-2 engine path on CPU.
"""

from __future__ import annotations

import os

import pytest
import yaml
from conftest import StopAt, small_train_config, spawn_ranks

from maestro import config
from maestro.errors import CheckpointError
from maestro.train import checkpoint, resume
from maestro.train.loop import train

pytestmark = pytest.mark.usefixtures("clean_group_env")


@pytest.fixture(scope="module")
def stopped_run(train_archive, tmp_path_factory, clean_group_env_module):
    """`(storage, summary)`: one small run stopped at step 2, shared by the refusal tests (a refused
    resume changes nothing in the run, which each of them asserts)."""
    storage = tmp_path_factory.mktemp("stopped")
    return storage, train(small_train_config(train_archive, storage, "fixed"), on_step=StopAt(2))


@pytest.mark.parametrize(
    "override, keys",
    [
        ("data.batch_size=4", "data.batch_size"),
        ("optim.base_lr=0.001", "optim.base_lr"),
        ("model.size=tiny", "model.size"),
    ],
)
def test_changed_key_that_cannot_change_is_refused_in_one_line(override, keys, stopped_run, train_archive):
    storage, first = stopped_run
    assert first["stopped"] and first["step"] == 2
    saved = (storage / "fixed" / "config.yaml").read_bytes()
    changed = small_train_config(train_archive, storage, "fixed", override)
    with pytest.raises(CheckpointError, match=keys):  # what the launcher checks before workers start
        resume.check_config(changed, str(storage / "fixed"))
    with pytest.raises(CheckpointError) as e:
        train(changed)
    message = str(e.value)
    where = f"{storage}/fixed/{checkpoint.tag(2)}"
    assert message.startswith(f"cannot resume {where} with other values of {keys}: ") and "\n" not in message
    old = yaml.safe_load(saved)
    section, key = keys.split(".")
    assert f"trained with {keys}={old[section][key]} (this config: {override})" in message
    assert "another run.name" in message
    assert (storage / "fixed" / "config.yaml").read_bytes() == saved  # not overwritten
    assert checkpoint.CheckpointStore(str(storage / "fixed"), keep=3).complete_steps() == [2]


def test_several_fixed_keys_are_named_together(small_run, tmp_path):
    train(small_run("many", "train.steps=2"))
    with pytest.raises(
        CheckpointError, match=r"other values of data\.batch_size, optim\.base_lr, train\.steps: "
    ):
        train(small_run("many", "data.batch_size=4", "optim.base_lr=0.001", "train.steps=3"))


def test_changed_accumulation_and_logging_are_accepted_and_printed(small_run, tmp_path, capsys):
    train(small_run("changes"), on_step=StopAt(2))
    capsys.readouterr()
    changed = small_run("changes", "train.grad_accum=2", "train.log_every=2")
    resumed = train(changed)
    out = capsys.readouterr().out
    assert "with changed settings: train.grad_accum 1 → 2; train.log_every 1 → 2" in out
    assert resumed["start_step"] == 2 and resumed["step"] == 4 and resumed["global_batch"] == 4
    saved = yaml.safe_load((tmp_path / "changes" / "config.yaml").read_text())
    assert saved["train"]["grad_accum"] == 2  # written once the resume was accepted


def _what(summary: dict) -> dict:
    return {k: summary[k] for k in ("stage", "precision", "optimizer", "global_batch", "workers")}


def test_one_worker_run_resumes_on_two_and_back_on_one(small_run, tmp_path):
    """ZeRO 0 (what a one-worker run trains with) in both directions; each rank's data state is
    read only where the saved layout is this run's, so rank 1 never looks for a file a
    one-worker checkpoint has not got."""
    cfg = small_run("grow", "train.steps=6")
    assert train(cfg, on_step=StopAt(2))["step"] == 2
    two = small_run("grow", "train.steps=6", "run.workers=2")
    assert resume.what_runs(two, str(tmp_path / "grow"))["stage"] == 0
    grown = spawn_ranks(two, tmp_path, stop=4)
    assert (grown["start_step"], grown["step"], grown["stopped"]) == (2, 4, True)
    assert _what(grown) == resume.what_runs(two, str(tmp_path / "grow")) | {"workers": 2}
    files = set(os.listdir(tmp_path / "grow" / checkpoint.tag(4)))
    assert {"rank0_data.pt", "rank1_data.pt"} <= files
    shrunk = train(cfg)
    assert (shrunk["start_step"], shrunk["step"]) == (4, 6)
    assert checkpoint.CheckpointStore(str(tmp_path / "grow"), keep=3).complete_steps() == [2, 4, 6]


@pytest.mark.parametrize(
    "stage", [2, pytest.param(1, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)]
)
def test_demo_bf16_engine_on_two_workers_resumes_on_one_and_two_again(stage, tmp_path, train_archive):
    """The demo config's engine path in bf16 on CPU: 2 workers at ZeRO `stage`, then 1 worker (the
    checkpoint's universal form, the stage kept and reported as such), then 2 again."""
    base = [
        "model.size=debug",
        "model.inter_depth=1",
        "data.batch_size=2",
        "data.workers=0",
        f"data.shards={train_archive}",
        f"run.storage={tmp_path}",
        "run.name=demo",
        "run.use_gpu=false",
        "train.precision=bf16",
        f"train.zero_stage={stage}",
        "train.steps=4",
        "train.checkpoint_every=100",
        "train.log_every=1",
        "train.image_every=100",
    ]
    two = config.load("configs/demo.yaml", [*base, "run.workers=2"])
    first = spawn_ranks(two, tmp_path, stop=2)
    assert (first["step"], first["stopped"]) == (2, True)
    optimizer = "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"
    assert _what(first) == {
        "stage": stage,
        "precision": "bf16",
        "optimizer": optimizer,
        "global_batch": 4,
        "workers": 2,
    }
    assert first["loss"] == first["loss"]  # finite from the first log step (NaN would have stopped it)
    one = config.load("configs/demo.yaml", [*base, "run.workers=1"])
    predicted = resume.what_runs(one, str(tmp_path / "demo"))
    assert predicted["stage"] == stage  # the banner's view: the resumed run keeps its stage
    middle = train(one, on_step=StopAt(3))
    assert (middle["start_step"], middle["step"]) == (2, 3)
    assert _what(middle) == predicted
    saved = yaml.safe_load((tmp_path / "demo" / "config.yaml").read_text())
    assert saved["derived"]["deepspeed"]["zero_optimization"]["stage"] == stage  # what ran, not 0
    assert saved["derived"]["global_batch"] == 2
    last = spawn_ranks(two, tmp_path)
    assert (last["start_step"], last["step"], last["stopped"]) == (3, 4, False)
    assert checkpoint.CheckpointStore(str(tmp_path / "demo"), keep=3).complete_steps() == [2, 3, 4]


def test_a_weighted_mix_of_splits_resumes_exactly_and_keeps_its_weights(train_archive, tmp_path):
    """`data.shards` as weighted splits: a run stopped at step 2 resumes to the curve of an
    uninterrupted one; other weights on resume are refused (they change what an epoch holds)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from shards.synth import write_synthetic

    write_synthetic(str(tmp_path / "b"), "treesatai_ts", samples=8, seed=1, max_dates=4, shard_samples=4)
    mix = f"data.shards=[{{path: {train_archive}, weight: 0.5}}, {{path: {tmp_path / 'b' / 'train'}, weight: 2}}]"

    def run(name, *extra):
        return small_train_config(train_archive, tmp_path, name, mix, "train.steps=5", *extra)

    def losses(name):
        acc = EventAccumulator(str(tmp_path / name / "tensorboard"), size_guidance={"scalars": 0}).Reload()
        return {e.step: e.value for e in acc.Scalars("train/loss")}

    whole = train(run("whole"))
    assert whole["step"] == 5
    assert train(run("cut"), on_step=StopAt(2))["step"] == 2
    other = mix.replace("weight: 2}", "weight: 1}")
    with pytest.raises(CheckpointError, match=r"other values of data\.shards"):
        train(small_train_config(train_archive, tmp_path, "cut", other, "train.steps=5"))
    resumed = train(run("cut"))
    assert (resumed["start_step"], resumed["step"]) == (2, 5)
    a, b = losses("whole"), losses("cut")
    assert sorted(b) == sorted(a) == [1, 2, 3, 4, 5]
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-5)
