"""The loop's side of elasticity in one plain process (no Ray): a preemption notice answered by a
checkpoint at every log step while it stands, training going on to the end; and the packed data
stream re-split across resizes."""

from __future__ import annotations

import itertools

import pytest
from conftest import small_train_config

from maestro import config
from maestro.train import checkpoint
from maestro.train.loop import train

pytestmark = pytest.mark.usefixtures("clean_group_env")


class NoticeFrom:
    """A preemption notice standing from the log step `step` on; counts its polls."""

    def __init__(self, step: int):
        self.step, self.polls = step, 0

    def __call__(self) -> str | None:
        self.polls += 1
        return "node 1234abcd (rank(s) [0]) to be preempted" if self.polls * 2 >= self.step else None


def test_a_standing_preemption_notice_checkpoints_at_each_log_step_and_training_goes_on(
    train_archive, tmp_path, capsys
):
    cfg = small_train_config(
        train_archive, tmp_path, "notice", "train.steps=8", "train.log_every=2",
        "train.checkpoint_every=100", "train.keep_checkpoints=10",
    )  # fmt: skip
    notice = NoticeFrom(step=4)
    summary = train(cfg, notice=notice)
    assert summary["step"] == 8 and not summary["stopped"]
    assert notice.polls == 4  # once per log step: 2, 4, 6, 8
    store = checkpoint.CheckpointStore(str(tmp_path / "notice"), keep=10)
    assert store.complete_steps() == [4, 6, 8]  # none periodic before the end: from the notice on
    out = capsys.readouterr().out
    assert out.count("preemption notice: node 1234abcd") == 1
    assert "checkpoint at step 4 and at each log step until it goes" in out


def test_packed_shuffled_stream_resized_mid_epoch_sees_each_sample_once(tmp_path):
    """`data.token_budget` packing with shuffling across two resizes (2 ranks × 1 loader worker →
    3 × 0 → 1 × 0): a sample read into a batch that could not hold it is carried, not counted, so
    no rank repeats or drops it after a resume (llm-foundry #1277).

    A packed batch is labelled with the epoch of its last sample: the batches labelled 0 hold
    epoch 0's samples only, and the one stream of the last layout finishes epoch 0 in the first
    batch labelled 1, whose first samples are then exactly the ones not seen before."""
    import json

    from maestro import storage
    from maestro.data import build_loader
    from shards.synth import write_synthetic

    write_synthetic(
        str(tmp_path), "treesatai_ts", 23, seed=1, sizes={"aerial": 34}, max_dates=20, shard_samples=5
    )
    url = storage.join(str(tmp_path), "train")
    aerial = {"aerial": {"resolution_m": 2.0, "image_size": 30, "patch_size": 10}}
    modalities = {**aerial, "s2": {"dates": "all"}, "s1_asc": {"dates": "all"}, "s1_des": {"dates": "all"}}

    def cfg(workers):
        data = {"shards": url, "batch_size": 4, "workers": workers, "shuffle_buffer": 6}
        return config.from_dict({"data": {**data, "modalities": modalities, "token_budget": 1200}})

    def layout(world, workers, states, batches):
        """Epoch 0's keys and the first batch past it of each rank's `batches`, and the states."""
        keys, past, out = [], [], []
        for r in range(world):
            loader = build_loader(cfg(workers), r, world)
            if states:
                loader.resume(json.loads(json.dumps(states)))  # as stored: JSON-able
            for b in itertools.islice(iter(loader), batches):
                assert "cu_seqlens" in b  # packed
                if b["_epoch"] > 0:
                    past.append(list(b["_keys"]))
                    break
                keys += b["_keys"]
            out.append(loader.state_dict())
        return keys, past, out

    first, past, states = layout(2, 1, None, 2)
    assert not past and len(first) == 8  # mid-epoch, two samples per packed batch (a third carried)
    second, past, states = layout(3, 0, states, 1)
    assert not past and len(second) == 6
    rest, past, _ = layout(1, 0, states, 30)
    seen = first + second + rest
    assert len(seen) == len(set(seen)), sorted(seen)  # no sample twice
    boundary = past[0]
    everything = set(seen) | set(boundary)
    assert len(everything) == 23
    missing = everything - set(seen)
    assert set(boundary[: len(missing)]) == missing  # the rest of epoch 0, then epoch 1 begins
