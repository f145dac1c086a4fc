"""A cheap probe during pretraining (`eval.every`): a linear classifier fitted on frozen embeddings.

`probe_scores(cfg, model, device)` embeds the first `eval.probe_samples` samples of
`eval.train` (fit) and of `eval.val` (score) with the model as it stands, fits one linear layer
per target on the standardized embeddings (full-batch Adam, `FIT_STEPS` steps, fixed seed) with
the task's loss, and returns `{"eval/probe_METRIC": value}` for the first target, computed as the
phases compute them. Embeddings are each modality's mean token, concatenated, `(M·E)`: a mean over
all tokens mixes the modalities (on synthetic TreeSatAI-TS the concatenation separates a pretrained
encoder from a random one by 0.12 weighted F1, the mean of all tokens by 0.05); for segmentation, each location of the head's reference grid is a sample
(its tokens averaged over dates and modalities resized to that grid, as the segmentation head
sees them) with the label raster resized (nearest) to the grid.

It runs on one process with the whole model (ZeRO stage ≤ 2): the trainer calls it on rank 0
at log steps. `probe_model` gives the same scores for any model (a test compares a pretrained
and a random encoder with it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from maestro.config import Config
from maestro.eval.data import Pass, split_url
from maestro.eval.tasks import build_metric, labels_of, task_loss
from maestro.modalities import TargetSpec

FIT_STEPS = 300
FIT_LR = 0.05
SEED = 0


def _grid_tokens(tokens: dict[str, Tensor], specs: dict, grid: int) -> Tensor:
    """{MOD: (B, G·T·L, E)} -> (B, g², E): tokens averaged over dates, modalities resized to `grid`."""
    maps = []
    for m, x in tokens.items():
        side = specs[m].grid
        x = rearrange(x, "b (d y z) e -> b e d y z", y=side, z=side).mean(2)
        if side != grid:
            x = F.interpolate(x, size=(grid, grid), mode="bilinear")
        maps.append(x)
    return rearrange(torch.stack(maps).mean(0), "b e y z -> b (y z) e")


@torch.no_grad()
def embed_split(
    cfg: Config, model: nn.Module, split: str, device: torch.device
) -> tuple[Tensor, dict[str, Tensor]]:
    """(N, E) features and {TARGET: labels} of the first `eval.probe_samples` samples of a split."""
    from maestro.train.loop import to_device

    target, spec = next(iter(cfg.derived.targets.items()))
    feats, labels = [], []
    for batch in Pass(cfg, split_url(cfg, split), limit=cfg.eval.probe_samples).batches():
        b = to_device(batch, device)
        tokens = model.encode(b)
        y = labels_of(spec, b[target])
        if spec.kind == "segmentation":
            grid = cfg.derived.modalities[spec.reference].grid
            feats.append(_grid_tokens(tokens, cfg.derived.modalities, grid).flatten(0, 1).float())
            y = F.interpolate(y[:, None].float(), size=(grid, grid), mode="nearest")[:, 0].long()
            labels.append(y.flatten())
        else:
            feats.append(torch.cat([x.mean(1) for x in tokens.values()], 1).float())  # (B, M·E)
            labels.append(y)
    return torch.cat(feats), {target: torch.cat(labels)}


def fit_and_score(
    spec: TargetSpec, train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor
) -> dict[str, float]:
    """A linear layer fitted on standardized features with the task's loss; metrics on val."""
    flat = (
        TargetSpec("classification", spec.num_classes, spec.missing) if spec.kind == "segmentation" else spec
    )
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    xs, xv = (train_x - mean) / std, (val_x - mean) / std
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    layer = nn.Linear(xs.shape[1], spec.num_classes).to(xs.device)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.01)
        layer.bias.zero_()
    opt = torch.optim.Adam(layer.parameters(), lr=FIT_LR, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(FIT_STEPS):
            opt.zero_grad(set_to_none=True)
            task_loss(flat, layer(xs), train_y).backward()
            opt.step()
    metric = build_metric(flat, xs.device)
    with torch.no_grad():
        logits = layer(xv)
    if flat.kind == "multilabel":
        keep = (val_y != spec.missing).all(1)
        logits, val_y = logits[keep], val_y[keep]
    metric.update(logits, val_y)
    return metric.compute()


def probe_model(cfg: Config, model: nn.Module, device: torch.device) -> dict[str, float]:
    """Metrics of a linear probe of `model`'s frozen embeddings (see the module docstring)."""
    target, spec = next(iter(cfg.derived.targets.items()))
    was_training = model.training
    model.eval()
    try:
        tx, ty = embed_split(cfg, model, "train", device)
        vx, vy = embed_split(cfg, model, "val", device)
    finally:
        model.train(was_training)
    return fit_and_score(spec, tx, ty[target], vx, vy[target])


def probe_scores(cfg: Config, model: nn.Module, device: torch.device) -> dict[str, float]:
    """`{"eval/probe_METRIC": value}` for TensorBoard (the trainer's in-loop evaluation)."""
    return {f"eval/probe_{k}": v for k, v in probe_model(cfg, model, device).items()}
