"""The loop's side of elasticity in one plain process (no Ray): a preemption notice answered by a
checkpoint at every log step while it stands, training going on to the end."""

from __future__ import annotations

import pytest

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
    cfg = config.load(
        "configs/demo.yaml",
        [
            "model.size=debug",
            "model.inter_depth=1",
            "data.modalities.aerial.image_size=60",
            "data.modalities.s2.num_dates=4",
            "data.modalities.s1_asc.num_dates=2",
            "data.modalities.s1_des.num_dates=2",
            "data.inputs=[aerial,s2]",
            "data.batch_size=2",
            "data.workers=0",
            "run.workers=1",
            "train.steps=8",
            "train.log_every=2",
            "train.checkpoint_every=100",
            "train.keep_checkpoints=10",
            "train.image_every=100",
            f"data.shards={train_archive}",
            f"run.storage={tmp_path}",
            "run.name=notice",
        ],
    )
    notice = NoticeFrom(step=4)
    summary = train(cfg, notice=notice)
    assert summary["step"] == 8 and not summary["stopped"]
    assert notice.polls == 4  # once per log step: 2, 4, 6, 8
    store = checkpoint.CheckpointStore(str(tmp_path / "notice"), keep=10)
    assert store.complete_steps() == [4, 6, 8]  # none periodic before the end: from the notice on
    out = capsys.readouterr().out
    assert out.count("preemption notice: node 1234abcd") == 1
    assert "checkpoint at step 4 and at each log step until it goes" in out
