"""The reference's optimizer recipe (maestro_reference.md §5.2).

AdamW with betas (0.9, 0.99) and weight decay 0.01 on every parameter (the reference decays norms
and biases too; `optim.decay_norms_and_biases=false` gives the usual exclusions). The absolute
learning rate is `cfg.derived.lr` (square-root scaling of the global batch, computed in
`config.resolve`). One-cycle schedule stepped per optimizer step: warm-up over `pct_start` of the
steps from `lr / div_factor`, cosine annealing to `lr / final_factor`.
"""

from __future__ import annotations

import math

import torch

from maestro import config
from maestro.config import Config


def parameter_groups(cfg: Config, model: torch.nn.Module) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim.decay_norms_and_biases:
        return [{"params": params, "weight_decay": cfg.optim.weight_decay}]
    # Norm weights, biases and single tokens are 1-D or scalars; matrices and embeddings are not.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW over whole tensors in a few kernels: fused on GPUs, foreach (multi-tensor) on CPU."""
    betas = (cfg.optim.betas[0], cfg.optim.betas[1])
    fused = config.uses_gpu(cfg)
    return torch.optim.AdamW(
        parameter_groups(cfg, model), lr=cfg.derived.lr, betas=betas, fused=fused, foreach=not fused
    )


def build_schedule(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.OneCycleLR:
    o = cfg.optim
    pct_start = o.pct_start
    if pct_start * cfg.train.steps == 1.0:
        # torch's warm-up phase would end at step 0 and divide 0 by 0 there (train.steps=5 at the
        # default 0.2). A hair less is what shorter runs get (4 steps start at 95% of the peak):
        # no warm-up, the peak at step 0, then the cosine decay.
        pct_start = math.nextafter(pct_start, 0.0)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.derived.lr,
        total_steps=cfg.train.steps,
        pct_start=pct_start,
        anneal_strategy="cos",
        cycle_momentum=False,
        div_factor=o.div_factor,
        final_div_factor=o.final_factor / o.div_factor,
    )
