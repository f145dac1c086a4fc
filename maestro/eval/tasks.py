"""Downstream tasks from the shards' labels: the reference's losses and each task's metrics.

| kind | logits | labels in the batch | loss (maestro_reference.md §3) |
|---|---|---|---|
| multilabel | (B, K) | (B, K) 0/1 | BCE-with-logits over the rows with no missing label |
| classification | (B, K) | (B,) class ids | cross-entropy over the rows not missing |
| segmentation | (B, K, H, W) | (B, H, W) or (B, 1, H, W) | cross-entropy over the pixels not missing |

Losses of several targets are summed, as the reference. A segmentation label raster of another
size than the head's output (synthetic archives store labels at the finest input's resolution)
is compared with the logits resized bilinearly to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from maestro.eval.metrics import ConfusionMetrics, Metric, MultilabelMetrics
from maestro.modalities import TargetSpec


def labels_of(spec: TargetSpec, y: Tensor) -> Tensor:
    """A batch's labels in the task's layout: (B, K), (B,) or (B, H, W), int64."""
    if spec.kind == "segmentation":
        return y.reshape(y.shape[0], *y.shape[-2:]).long()
    if spec.kind == "classification":
        return y.reshape(y.shape[0]).long()
    return y.reshape(y.shape[0], -1).long()


def aligned(spec: TargetSpec, logits: Tensor, labels: Tensor) -> Tensor:
    """Segmentation logits on the label raster's grid (unchanged when the sizes agree)."""
    if spec.kind == "segmentation" and logits.shape[-2:] != labels.shape[-2:]:
        return F.interpolate(logits, size=labels.shape[-2:], mode="bilinear")
    return logits


def task_loss(spec: TargetSpec, logits: Tensor, y: Tensor) -> Tensor:
    """The reference's loss of one target (0 when the batch has nothing labelled)."""
    labels = labels_of(spec, y)
    logits = aligned(spec, logits, labels).float()
    if spec.kind == "multilabel":
        keep = (labels != spec.missing).all(1)
        if not keep.any():
            return logits.sum() * 0.0
        return F.binary_cross_entropy_with_logits(logits[keep], labels[keep].float())
    if spec.kind == "classification":
        keep = labels != spec.missing
        if not keep.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits[keep], labels[keep])
    known = labels != spec.missing
    if not known.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels.masked_fill(~known, -100), ignore_index=-100)


def build_metric(spec: TargetSpec, device: torch.device | str = "cpu") -> Metric:
    if spec.kind == "multilabel":
        return MultilabelMetrics(spec.num_classes, device)
    return ConfusionMetrics(spec.num_classes, spec.missing, device)


def update_metric(metric: Metric, spec: TargetSpec, logits: Tensor, y: Tensor) -> None:
    """Add a batch: rows with a missing label are left out of multi-label metrics."""
    labels = labels_of(spec, y)
    logits = aligned(spec, logits, labels)
    if spec.kind == "multilabel":
        keep = (labels != spec.missing).all(1)
        logits, labels = logits[keep], labels[keep]
    metric.update(logits, labels)


def default_monitor(spec: TargetSpec) -> str:
    """The reference's monitored metric: weighted F1 for classification, mIoU for segmentation."""
    return "miou" if spec.kind == "segmentation" else "weighted_f1"
