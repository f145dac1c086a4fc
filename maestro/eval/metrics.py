"""Downstream metrics as the reference's (maestro_reference.md §5.6), from states summed over ranks.

Every state is a tensor of counts, so ranks add theirs with one all-reduce (when
`torch.distributed` is initialized) and the metrics follow from the sums:

- multi-label: per-label 2×2 confusion at sigmoid ≥ 0.5 → `weighted_f1` (F1 weighted by support
  TP+FN), `macro_f1`, `overall_accuracy` (label decisions right), `miou` (IoU of labels with
  support);
- segmentation and single-label classification: a K×K confusion over labelled pixels (samples)
  → `miou` over classes with support, `overall_accuracy`, `weighted_f1`, `macro_f1` over
  classes with support;
- both: `ap`, the mean over classes with positives of the average precision
  (Σ (Rₙ − Rₙ₋₁)·Pₙ over thresholds, as scikit-learn), from histograms of the positive and negative
  scores in `AP_BINS` bins: exact when no two scores share a bin, ties otherwise treated as
  scikit-learn treats equal scores; `weighted_ap` weights it by support.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

AP_BINS = 1000
NAMES = ("weighted_f1", "macro_f1", "ap", "overall_accuracy", "miou")


def _score_bins(p: Tensor) -> Tensor:
    return (p * AP_BINS).long().clamp_(0, AP_BINS - 1)


def average_precision(pos: Tensor, neg: Tensor) -> Tensor:
    """(K, bins) histograms of positive and negative scores -> (K,) AP (NaN without positives)."""
    tp = pos.flip(-1).cumsum(-1).double()  # scores >= each threshold, highest threshold first
    fp = neg.flip(-1).cumsum(-1).double()
    total = tp[:, -1:]
    recall = tp / total
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), 0.0)
    step = torch.diff(recall, dim=-1, prepend=torch.zeros_like(recall[:, :1]))
    return (step * precision).sum(-1)


def _f1_iou(tp: Tensor, fp: Tensor, fn: Tensor) -> tuple[Tensor, Tensor]:
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)  # NaN where undefined (0/0)


def _mean(x: Tensor, keep: Tensor, weights: Tensor | None = None) -> float:
    keep = keep & ~x.isnan()
    if not keep.any():
        return math.nan
    if weights is None:
        return float(x[keep].mean())
    w = weights.double()[keep]
    return float((x[keep] * w).sum() / w.sum())


class Metric:
    """Count states, `update` per batch, `compute` after summing over ranks."""

    states: tuple[str, ...] = ()

    def reduce(self) -> None:
        """Sum the states over ranks (a no-op without a process group)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for name in self.states:
                t = getattr(self, name)
                torch.distributed.all_reduce(t)

    def _ap(self, support: Tensor) -> dict[str, float]:
        ap = average_precision(self.pos, self.neg)
        present = support > 0
        return {"ap": _mean(ap, present), "weighted_ap": _mean(ap, present, support)}


class MultilabelMetrics(Metric):
    """Multi-label classification: logits (B, K), labels (B, K) in {0, 1}."""

    states = ("confusion", "pos", "neg")

    def __init__(self, classes: int, device: torch.device | str = "cpu"):
        self.confusion = torch.zeros(classes, 2, 2, dtype=torch.int64, device=device)  # [k, truth, pred]
        self.pos = torch.zeros(classes, AP_BINS, dtype=torch.int64, device=device)
        self.neg = torch.zeros_like(self.pos)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        k = logits.shape[1]
        p = torch.sigmoid(logits.detach().float())
        truth, pred = labels.long(), (p >= 0.5).long()
        cell = (torch.arange(k, device=p.device) * 4 + truth * 2 + pred).flatten()
        self.confusion += torch.bincount(cell, minlength=4 * k).view(k, 2, 2)
        bins = _score_bins(p) + torch.arange(k, device=p.device) * AP_BINS
        hist = [torch.bincount(bins[truth == t], minlength=k * AP_BINS).view(k, AP_BINS) for t in (0, 1)]
        self.neg += hist[0]
        self.pos += hist[1]

    def compute(self) -> dict[str, float]:
        c = self.confusion
        tp, fp, fn, tn = c[:, 1, 1], c[:, 0, 1], c[:, 1, 0], c[:, 0, 0]
        f1, iou = _f1_iou(tp, fp, fn)
        support = tp + fn
        present = support > 0
        every = torch.ones_like(present)
        total = c.sum()
        return {
            "weighted_f1": _mean(f1, present, support),
            "macro_f1": _mean(f1, every),
            "overall_accuracy": float((tp + tn).sum() / total) if total else math.nan,
            "miou": _mean(iou, present),
            **self._ap(support),
        }


class ConfusionMetrics(Metric):
    """Segmentation (logits (B, K, H, W), labels (B, H, W)) or single-label classification (logits
    (B, K), labels (B,)); labels equal to `missing` are left out."""

    states = ("confusion", "pos", "neg")

    def __init__(self, classes: int, missing: int, device: torch.device | str = "cpu"):
        self.classes, self.missing = classes, missing
        self.confusion = torch.zeros(classes, classes, dtype=torch.int64, device=device)  # [truth, pred]
        self.pos = torch.zeros(classes, AP_BINS, dtype=torch.int64, device=device)
        self.neg = torch.zeros_like(self.pos)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        k = self.classes
        scores = logits.detach().float().movedim(1, -1).reshape(-1, k)  # (N, K)
        truth = labels.reshape(-1).long()
        keep = (truth != self.missing) & (truth >= 0) & (truth < k)
        scores, truth = scores[keep], truth[keep]
        pred = scores.argmax(1)
        self.confusion += torch.bincount(truth * k + pred, minlength=k * k).view(k, k)
        p = torch.softmax(scores, 1)
        bins = _score_bins(p) + torch.arange(k, device=p.device) * AP_BINS
        positive = torch.nn.functional.one_hot(truth, k).bool()
        self.pos += torch.bincount(bins[positive], minlength=k * AP_BINS).view(k, AP_BINS)
        self.neg += torch.bincount(bins[~positive], minlength=k * AP_BINS).view(k, AP_BINS)

    def compute(self) -> dict[str, float]:
        c = self.confusion
        tp = c.diagonal()
        fp, fn = c.sum(0) - tp, c.sum(1) - tp
        f1, iou = _f1_iou(tp, fp, fn)
        support = tp + fn
        present = support > 0
        total = c.sum()
        return {
            "weighted_f1": _mean(f1, present, support),
            "macro_f1": _mean(f1, present),
            "overall_accuracy": float(tp.sum() / total) if total else math.nan,
            "miou": _mean(iou, present),
            **self._ap(support),
        }
