"""The tiny model trains to the same losses with `model.kernels=triton` (Triton interpreter on CPU)
and `model.kernels=torch` (pure-torch references)."""

from __future__ import annotations

import torch

from maestro.model import build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU, interpreter on CPU


def _losses(kernels: str, small_config, make_batch, steps: int = 2) -> list[torch.Tensor]:
    cfg = small_config(f"model.kernels={kernels}")
    torch.manual_seed(0)
    model = build_model(cfg).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = make_batch(cfg, batch=2, seed=1)
    g = torch.Generator().manual_seed(2)
    valid = torch.rand(batch["s2"].shape[:2] + batch["s2"].shape[3:], generator=g) > 0.2
    batch["s2_valid"] = valid
    batch["s2"] = batch["s2"].masked_fill(~valid[:, :, None], float("nan"))  # invalid pixels hold NaN
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    out = []
    for step in range(steps):
        res = model(batch, generator=torch.Generator(DEVICE).manual_seed(step))
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        out.append(torch.stack([res.loss.detach(), *res.loss_per_modality.values()]))
    return out


def test_triton_and_torch_kernels_train_to_the_same_loss(small_config, make_batch):
    """The reference recipe's loss (l1, patch_group); the raw-target and l2 paths are covered op by op
    in test_kernels_group_norm_target.py."""
    torch_losses = _losses("torch", small_config, make_batch)
    triton_losses = _losses("triton", small_config, make_batch)
    assert all(torch.isfinite(x).all() for x in torch_losses)
    assert not torch.equal(torch_losses[0], torch_losses[-1])  # the steps did train
    for a, b in zip(triton_losses, torch_losses):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
