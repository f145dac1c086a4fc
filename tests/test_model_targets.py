"""Target normalization and the masked loss against hand-computed values; band groups; EMA."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange

from maestro import config
from maestro.errors import ConfigError
from maestro.model import build_model, targets
from maestro.model.ema import EMA, reference_momentum
from maestro.model.ops import kernel_ops
from maestro.model.patch_embed import to_patches

OPS = kernel_ops("torch")


def toy():
    """Two patches of 2 pixels × 3 channels; patch 0 masked, patch 1 visible."""
    target = torch.zeros(2, 2, 3)
    target[0, :, 0] = torch.tensor([1.0, 3.0])
    target[0, :, 1:] = torch.tensor([[2.0, 4.0], [6.0, 8.0]])
    target[1] = 100.0  # visible: must not count
    return target, torch.tensor([[True, False]])  # token mask (G=1, M=2)


def test_patch_group_normalization_and_l1_by_hand():
    target, tmask = toy()
    pred = torch.zeros_like(target)
    valid = torch.ones(2, 2, dtype=torch.bool)
    s, n = targets.modality_loss(OPS, pred, target, valid, tmask, [3], [[1, 2]], "l1")
    # Group {c0}: values 1, 3 → mean 2, unbiased var 2. Group {c1, c2}: 2, 4, 6, 8 → mean 5, var 20/3.
    want = 2 * 1 / math.sqrt(2 + 1e-6) + (3 + 1 + 1 + 3) / math.sqrt(20 / 3 + 1e-6)
    assert n.item() == 6 and s.item() == pytest.approx(want, rel=1e-6)


def test_invalid_pixels_leave_the_statistics_and_the_count():
    target, tmask = toy()
    target[0, 1] = float("nan")  # invalid pixel (zeroed by the model before it gets here)
    valid = torch.tensor([[True, False], [True, True]])
    s, n = targets.modality_loss(
        OPS, torch.zeros_like(target), torch.nan_to_num(target), valid, tmask, [3], [[1, 2]], "l1"
    )
    # {c0}: a single value → variance 0 → 0. {c1, c2}: 2, 4 → mean 3, var 2.
    assert n.item() == 3 and s.item() == pytest.approx(2 / math.sqrt(2 + 1e-6), rel=1e-6)


def test_raw_targets_and_l2_by_hand():
    target, tmask = toy()
    pred = torch.ones_like(target)
    s, n = targets.modality_loss(
        OPS, pred, target, torch.ones(2, 2, dtype=torch.bool), tmask, [3], [None], "l2"
    )
    assert n.item() == 6 and s.item() == pytest.approx(0 + 4 + 1 + 9 + 25 + 49)


def test_band_groups_use_their_own_token_mask():
    target, _ = toy()
    tmask = torch.tensor([[True, False], [False, True]])  # band group 0 masked on patch 0, group 1 on patch 1
    s, n = targets.modality_loss(
        OPS,
        torch.zeros_like(target),
        target,
        torch.ones(2, 2, dtype=torch.bool),
        tmask,
        [1, 2],
        [None, None],
        "l1",
    )
    assert n.item() == 2 * 1 + 2 * 2 and s.item() == pytest.approx(1 + 3 + 4 * 100)


def test_norm_plans():
    spec = config.from_dict({}).derived.modalities["s2"]
    assert targets.norm_plan("s2", spec, "patch_group") == [[4, 4, 2]]
    assert targets.norm_plan("s2", spec, "patch") == [[10]]
    assert targets.norm_plan("s2", spec, "none") == [None]
    grouped = config.from_dict({}, ["data.modalities.s2.band_groups=[8,2]"]).derived.modalities["s2"]
    assert targets.norm_plan("s2", grouped, "patch_group") == [[4, 4], [2]]
    crossing = config.from_dict({}, ["data.modalities.s2.band_groups=[5,5]"]).derived.modalities["s2"]
    with pytest.raises(ConfigError, match="norm_bands"):
        targets.norm_plan("s2", crossing, "patch_group")


def test_weighting_drops_modalities_with_nothing_counted():
    sums = {"a": (torch.tensor(6.0), torch.tensor(3.0)), "b": (torch.tensor(0.0), torch.tensor(0.0))}
    total, per_mod = targets.combine(sums, {"a": 2.0, "b": 5.0})
    assert total.item() == 2.0 and per_mod["b"].item() == 0.0
    sums["b"] = (torch.tensor(4.0), torch.tensor(1.0))
    assert targets.combine(sums, {"a": 2.0, "b": 6.0})[0].item() == pytest.approx((2 * 2 + 6 * 4) / 8)


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_model_loss_is_the_mean_over_masked_valid_pixels(kind, make_batch, small_config):
    cfg = small_config("loss.target_norm=none", f"loss.kind={kind}")
    model = build_model(cfg)
    batch = make_batch(cfg)
    batch["s2_valid"] = torch.rand(2, 16, 6, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(0))
    num = den = 0.0
    for m, s in cfg.derived.modalities.items():
        d = out.reconstructions[m] - out.targets[m]
        e = d.abs() if kind == "l1" else d * d
        counted = out.pixel_masks[m] & out.valid[m][:, :, None]
        want = e[counted].mean()
        torch.testing.assert_close(out.loss_per_modality[m], want)
        w = s.num_dates * s.tokens_per_date
        num, den = num + w * want, den + w
    torch.testing.assert_close(out.loss, num / den)


def test_band_groups_in_the_model(make_batch, small_config):
    cfg = small_config("data.modalities.s2.band_groups=[8,2]", "mask.bands=0.5")
    model = build_model(cfg)
    assert len(model.patch_embed["s2"].patchify_bands) == 2 and model.mask_token["s2"].shape[1] == 2
    out = model(make_batch(cfg), generator=torch.Generator().manual_seed(0))
    assert out.masks["s2"].shape == (2, 2 * 16 * 9)
    tok = out.masks["s2"].view(2, 2, 16, 3, 3)
    pix = out.pixel_masks["s2"][..., ::2, ::2]  # (B, T, C, 3, 3): one pixel per token
    assert torch.equal(pix[:, :, :8], tok[:, 0, :, None].expand(-1, -1, 8, -1, -1))
    assert torch.equal(pix[:, :, 8:], tok[:, 1, :, None].expand(-1, -1, 2, -1, -1))


def test_ema():
    model = torch.nn.Linear(3, 2)
    ema = EMA(list(model.parameters()), 0.9)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    copy = torch.nn.Linear(3, 2)
    ema.copy_to(list(copy.parameters()))
    torch.testing.assert_close(copy.weight, before + 0.1)
    torch.testing.assert_close(copy.bias, model.bias)
    assert reference_momentum(100) == pytest.approx(0.95) and reference_momentum(10) == pytest.approx(0.5)


def test_targets_of_a_bf16_model_keep_float32_values(small_config, make_batch):
    """A near-flat patch (a DEM-like 100 ± 0.01) has no variance left in bf16 (spacing 0.5 at 100):
    its normalized target must come from the float32 input, not from the encoder's bf16 copy."""
    cfg = small_config()
    torch.manual_seed(0)
    model = build_model(cfg).to(torch.bfloat16)
    batch = make_batch(cfg)
    flat = 100.0 + 0.01 * torch.rand(batch["s1_asc"].shape, generator=torch.Generator().manual_seed(1))
    batch["s1_asc"] = flat
    assert flat.bfloat16().float().std() == 0 and flat.std() > 0
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(0))
    assert out.targets["s1_asc"].dtype == torch.float32 and torch.equal(out.targets["s1_asc"], flat)
    s = cfg.derived.modalities["s1_asc"]
    valid = to_patches(out.valid["s1_asc"][:, :, None], s.patch_size)[..., 0]
    tm = rearrange(out.token_masks["s1_asc"], "b (g t l) -> g (b t l)", g=1, t=s.num_dates)
    plan = targets.norm_plan("s1_asc", s, "patch_group")

    def loss(target):
        total, count = targets.modality_loss(
            OPS, out.patches["s1_asc"], target, valid, tm, s.groups, plan, "l1"
        )
        return total / count

    exact, rounded = (
        loss(to_patches(flat, s.patch_size)),
        loss(to_patches(flat.bfloat16().float(), s.patch_size)),
    )
    torch.testing.assert_close(out.loss_per_modality["s1_asc"], exact)
    assert (exact - rounded).abs() > 0.1  # the two differ: the check above can tell them apart
