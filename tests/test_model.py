"""The model end to end on the tiny preset: shapes per fusion mode, gradients, determinism, invalid
pixels, variable date counts, and a short run that lowers the loss."""

from __future__ import annotations

import pytest
import torch
from test_model_batches import make_batch

from maestro import config, info
from maestro.errors import ConfigError
from maestro.model import build_model

# TreeSatAI-TS with a small aerial image keeps every test well under a second.
SMALL = ["data.modalities.aerial.image_size=60"]


def small_cfg(*overrides: str):
    return config.from_dict({}, [*SMALL, *overrides])


@pytest.mark.parametrize(
    "fusion,inter",
    [("group", 3), ("group", 0), ("mod", 3), ("mod", 0), ("monotemp", 0), ("shared", 0)],
)
def test_shapes_for_every_fusion_mode(fusion, inter):
    cfg = small_cfg(f"model.fusion={fusion}", f"model.inter_depth={inter}")
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = make_batch(cfg)
    out = model(batch, generator=torch.Generator().manual_seed(1))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    seqs = info.sequences(cfg)
    assert set(out.masks) == set(seqs)
    mods = cfg.derived.modalities
    for key, members in seqs.items():
        length = sum(mods[m].tokens for m in members)
        assert out.masks[key].shape == (2, length) and out.masks[key].dtype == torch.bool
    for m in mods:
        assert out.reconstructions[m].shape == batch[m].shape
        assert out.targets[m].shape == batch[m].shape
        assert out.pixel_masks[m].shape == batch[m].shape
        assert torch.isfinite(out.loss_per_modality[m])
    tokens = info.tokens(cfg)
    if fusion in ("group", "mod"):  # drawn visible counts are exactly what `maestro info` reports
        for key, v in tokens["groups"].items():
            assert (~out.masks[key]).sum(1).tolist() == [v["visible"]] * 2
    else:  # one sequence per image, each masked at the plain ratio
        for m, s in mods.items():
            per_image = (~out.masks[m]).view(2, -1, s.tokens_per_date).sum(-1)
            assert (per_image == s.tokens_per_date - round(0.75 * s.tokens_per_date)).all()
    enc = model.encode(batch)
    assert {m: tuple(v.shape) for m, v in enc.items()} == {m: (2, s.tokens, 192) for m, s in mods.items()}


def test_shared_mode_uses_one_encoder_and_decoder():
    model = build_model(small_cfg("model.fusion=shared", "model.inter_depth=0"))
    assert list(model.encoder) == ["shared"] and list(model.decoder) == ["shared"]
    assert set(model.mask_token) == {"aerial", "s2", "s1_asc", "s1_des"}


def test_user_regrouping_from_yaml():
    cfg = small_cfg("data.modalities.s2.group=s1")  # S2 joins S1 in one fusion group
    model = build_model(cfg)
    assert list(model.encoder) == ["aerial", "s1"]
    out = model(make_batch(cfg), generator=torch.Generator().manual_seed(0))
    assert out.masks["s1"].shape == (2, 144 + 36 + 36)


def test_every_parameter_gets_a_gradient():
    cfg = small_cfg()
    model = build_model(cfg)
    model(make_batch(cfg), generator=torch.Generator().manual_seed(0)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_fixed_generator_gives_the_same_loss_and_masks():
    cfg = small_cfg()
    model = build_model(cfg)
    batch = make_batch(cfg)
    a = model(batch, generator=torch.Generator().manual_seed(7))
    b = model(batch, generator=torch.Generator().manual_seed(7))
    c = model(batch, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.loss, b.loss)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert any(not torch.equal(a.masks[k], c.masks[k]) for k in a.masks)


def test_invalid_pixels_never_reach_the_loss():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = make_batch(cfg)
    gen = torch.Generator().manual_seed(3)
    mask = model(batch, generator=gen).masks
    clean = model(batch, mask=mask)
    dirty = dict(batch)
    dirty["s1_des"] = batch["s1_des"].clone()
    dirty["s1_des"][:, 1, 0, 2:4, 2:4] = float("nan")
    dirty["s2"] = batch["s2"].clone() + 0
    dirty["s2"][0, 3] = 1e6  # garbage flagged invalid
    valid = torch.ones(2, 16, 6, 6, dtype=torch.uint8)
    valid[0, 3] = 0
    dirty["s2_valid"] = valid
    dirty["s1_asc_valid"] = torch.zeros(2, 4, 6, 6, dtype=torch.bool)  # nothing valid at all
    out = model(dirty, mask=mask)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert out.loss_per_modality["s1_asc"] == 0  # contributes nothing, not NaN
    assert not out.valid["s1_des"][:, 1, 2:4, 2:4].any() and out.valid["s1_des"][:, 0].all()
    assert torch.isfinite(out.targets["s1_des"]).all()
    # Without s1_asc the total is the weighted mean of the others (weights N·g²).
    w = {"aerial": 9, "s2": 144, "s1_des": 36}
    expect = sum(w[m] * out.loss_per_modality[m] for m in w) / sum(w.values())
    torch.testing.assert_close(out.loss, expect)
    assert torch.isfinite(clean.loss) and not torch.equal(clean.loss, out.loss)


def test_dates_different_from_num_dates():
    cfg = small_cfg()
    model = build_model(cfg)
    batch = make_batch(cfg, dates={"s2": 5, "s1_asc": 7, "s1_des": 1})
    out = model(batch, generator=torch.Generator().manual_seed(0))
    assert out.masks["s2"].shape == (2, 5 * 9) and out.masks["s1"].shape == (2, (7 + 1) * 9)
    assert out.reconstructions["s2"].shape == (2, 5, 10, 6, 6)
    assert model.encode(batch)["s1_des"].shape == (2, 9, 192)


def test_resize_to_image_size():
    cfg = small_cfg()
    model = build_model(cfg)
    batch = make_batch(cfg)
    batch["aerial"] = batch["aerial"][..., :30, :30]  # loader crop smaller than image_size
    out = model(batch, generator=torch.Generator().manual_seed(0))
    assert out.targets["aerial"].shape == (2, 1, 4, 60, 60)


def test_short_run_on_a_fixed_batch_lowers_the_loss():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = make_batch(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    mask = model(batch, generator=torch.Generator().manual_seed(0)).masks
    for _ in range(24):
        out = model(batch, mask=mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.detach())
    first, last = torch.stack(losses[:3]).mean(), torch.stack(losses[-3:]).mean()
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("dataset", ["pastis_hd", "flair_hub", "flair2", "s2_naip"])
def test_every_dataset_preset(dataset):
    cfg = config.from_dict({"data": {"dataset": dataset}})
    model = build_model(cfg)
    batch = make_batch(cfg, batch=1)
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    groups = info.tokens(cfg)["groups"]
    assert {k: (~v).sum().item() for k, v in out.masks.items()} == {
        k: v["visible"] for k, v in groups.items()
    }
    assert all(out.reconstructions[m].shape == batch[m].shape for m in cfg.derived.modalities)


def test_output_is_also_a_mapping_with_lazy_images():
    from types import SimpleNamespace

    cfg = small_cfg()
    out = build_model(cfg)(make_batch(cfg), generator=torch.Generator().manual_seed(0))
    ns = SimpleNamespace(**out)  # how a training loop may unpack it
    assert ns.loss is out.loss and out["masks"] is out.masks
    assert set(ns.reconstructions) == set(cfg.derived.modalities)
    assert ns.pixel_masks["s2"].shape == (2, 16, 10, 6, 6)
    assert ns.reconstructions["s2"] is out.reconstructions["s2"]  # built once
    with pytest.raises(KeyError):
        out["geometry"]


def test_bf16_weights_and_inputs():
    cfg = small_cfg()
    model = build_model(cfg).to(torch.bfloat16)
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in make_batch(cfg).items()}
    out = model(batch, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert model.encode(batch)["aerial"].dtype == torch.bfloat16


def test_modalities_with_one_embedding_name_share_the_layers():
    cfg = small_cfg("data.modalities.s1_asc.embed=s1", "data.modalities.s1_des.embed=s1")
    model = build_model(cfg)
    assert list(model.patch_embed) == list(model.embed_to_rec) == ["aerial", "s2", "s1"]
    assert set(model.mask_token) == {"aerial", "s2", "s1_asc", "s1_des"}  # mask tokens stay per modality
    out = model(make_batch(cfg), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert model.patch_embed["s1"].patchify_bands[0].conv.weight.grad is not None


def test_flash_attention_on_cpu_is_a_clear_error():
    cfg = small_cfg("model.attention=flash")
    with pytest.raises(ConfigError, match="model.attention"):
        build_model(cfg).encode(make_batch(cfg))
