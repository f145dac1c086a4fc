"""Downstream losses and metrics against values worked out by hand; states summed over 2 gloo ranks."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from maestro.eval.metrics import ConfusionMetrics, MultilabelMetrics, average_precision
from maestro.eval.tasks import task_loss, update_metric
from maestro.modalities import TargetSpec

BIG = 20.0  # a logit whose sigmoid is 1 to float precision


def test_multilabel_metrics_by_hand():
    # Label 0: TP, TP, FN (support 3) -> F1 = 4/5; IoU = 2/3.
    # Label 1: FP, TN, TP (support 1) -> F1 = 2/3; IoU = 1/2.
    # Label 2: no positives, no predictions -> F1 = 0/0 (left out), no support.
    labels = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 1, 0]])
    logits = torch.tensor([[BIG, BIG, -BIG], [BIG, -BIG, -BIG], [-BIG, BIG, -BIG]])
    m = MultilabelMetrics(3)
    m.update(logits, labels)
    r = m.compute()
    assert r["weighted_f1"] == pytest.approx((3 * 4 / 5 + 1 * 2 / 3) / 4)
    assert r["macro_f1"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert r["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert r["overall_accuracy"] == pytest.approx(7 / 9)


def test_average_precision_as_scikit_learn():
    # Scores 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): AP = 1·½ + ⅔·½.
    m = MultilabelMetrics(1)
    p = torch.tensor([0.9, 0.8, 0.7, 0.1])
    m.update(torch.logit(p)[:, None], torch.tensor([1, 0, 1, 0])[:, None])
    assert m.compute()["ap"] == pytest.approx(0.5 + (2 / 3) * 0.5)
    # A class without positives has no AP (NaN), and is left out of the mean.
    assert math.isnan(float(average_precision(torch.zeros(1, 4), torch.ones(1, 4))[0]))


def test_segmentation_confusion_by_hand():
    # 3 classes, missing = 3. Pixels (truth -> pred): 0->0, 0->1, 1->1, 1->1, 3->0 (ignored).
    # Class 2 has no support and no prediction: left out of mIoU and the F1 means.
    truth = torch.tensor([[[0, 0, 1, 1, 3]]])  # (B=1, H=1, W=5)
    pred = torch.tensor([0, 1, 1, 1, 0])
    logits = F.one_hot(pred, 3).float().T.reshape(1, 3, 1, 5) * 10
    m = ConfusionMetrics(3, missing=3)
    m.update(logits, truth)
    r = m.compute()
    assert m.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert r["overall_accuracy"] == pytest.approx(3 / 4)
    assert r["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    f1 = (2 / 3, 4 / 5)
    assert r["macro_f1"] == pytest.approx(sum(f1) / 2)
    assert r["weighted_f1"] == pytest.approx((2 * f1[0] + 2 * f1[1]) / 4)


def test_multilabel_loss_drops_rows_with_a_missing_label():
    spec = TargetSpec("multilabel", 2, -1)
    logits = torch.tensor([[0.5, -1.0], [3.0, 3.0]])
    y = torch.tensor([[1, 0], [-1, 1]])
    want = F.binary_cross_entropy_with_logits(logits[:1], y[:1].float())
    assert task_loss(spec, logits, y) == pytest.approx(float(want))


def test_segmentation_loss_ignores_missing_pixels():
    spec = TargetSpec("segmentation", 3, 19, reference="s2", resolution_m=10)
    logits = torch.randn(1, 3, 2, 2)
    y = torch.tensor([[[[0, 19], [2, 19]]]])  # (B, 1, H, W) as the loader ships it
    flat = logits.permute(0, 2, 3, 1).reshape(4, 3)
    want = F.cross_entropy(flat[[0, 2]], torch.tensor([0, 2]))
    assert task_loss(spec, logits, y) == pytest.approx(float(want))
    # nothing labelled: a zero loss that still backpropagates
    assert task_loss(spec, logits, torch.full((1, 2, 2), 19)) == 0


def test_segmentation_labels_of_another_size_are_compared_at_their_own_size():
    spec = TargetSpec("segmentation", 2, -1, reference="s2", resolution_m=10)
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = 5.0
    m = ConfusionMetrics(2, -1)
    update_metric(m, spec, logits, torch.ones(1, 4, 4, dtype=torch.int64))
    assert m.confusion.tolist() == [[0, 0], [0, 16]]


def _rank(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    m = ConfusionMetrics(2, -1)
    # rank 0: truth 0 predicted 0; rank 1: truth 1 predicted 0
    logits = torch.tensor([[[[5.0]], [[0.0]]]])
    m.update(logits, torch.tensor([[[rank]]]))
    m.reduce()
    out.put((rank, m.confusion.tolist(), m.compute()["overall_accuracy"]))
    torch.distributed.destroy_process_group()


def test_confusions_are_summed_over_ranks():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert [g[1] for g in got] == [[[1, 0], [1, 0]]] * 2
    assert [g[2] for g in got] == [0.5, 0.5]
