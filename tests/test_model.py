"""The model end to end on the debug preset: shapes per fusion mode, gradients, determinism, invalid
pixels, variable date counts, padded batches, bf16, and a short run that lowers the loss."""

from __future__ import annotations

import pytest
import torch

from maestro import config, info
from maestro.errors import ConfigError
from maestro.model import build_model


@pytest.mark.parametrize(
    "fusion,inter",
    [("group", 1), ("group", 0), ("mod", 1), ("mod", 0), ("monotemp", 0), ("shared", 0)],
)
def test_shapes_for_every_fusion_mode(fusion, inter, small_config, make_batch):
    cfg = small_config(f"model.fusion={fusion}", f"model.inter_depth={inter}")
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
    assert {m: tuple(v.shape) for m, v in enc.items()} == {m: (2, s.tokens, 32) for m, s in mods.items()}


def test_shared_mode_uses_one_encoder_and_decoder(small_config):
    model = build_model(small_config("model.fusion=shared", "model.inter_depth=0"))
    assert list(model.encoder) == ["shared"] and list(model.decoder) == ["shared"]
    assert set(model.mask_token) == {"aerial", "s2", "s1_asc", "s1_des"}


def test_user_regrouping_from_yaml(small_config, make_batch):
    cfg = small_config("data.modalities.s2.group=s1")  # S2 joins S1 in one fusion group
    model = build_model(cfg)
    assert list(model.encoder) == ["aerial", "s1"]
    out = model(make_batch(cfg), generator=torch.Generator().manual_seed(0))
    assert out.masks["s1"].shape == (2, 144 + 36 + 36)


def test_every_parameter_gets_a_gradient(small_config, make_batch):
    cfg = small_config()
    model = build_model(cfg)
    model(make_batch(cfg), generator=torch.Generator().manual_seed(0)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # every pretraining parameter; the downstream heads (probe/fine-tune only) get none here
    assert missing == [n for n, _ in model.named_parameters() if n.startswith("heads.")]
    assert missing  # the config's target has a head


def test_fixed_generator_gives_the_same_loss_and_masks(small_config, make_batch):
    cfg = small_config()
    model = build_model(cfg)
    batch = make_batch(cfg)
    a = model(batch, generator=torch.Generator().manual_seed(7))
    b = model(batch, generator=torch.Generator().manual_seed(7))
    c = model(batch, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.loss, b.loss)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert any(not torch.equal(a.masks[k], c.masks[k]) for k in a.masks)


def test_invalid_pixels_never_reach_the_loss(small_config, make_batch):
    cfg = small_config()
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


def test_dates_different_from_num_dates(small_config, make_batch):
    cfg = small_config()
    model = build_model(cfg)
    batch = make_batch(cfg, dates={"s2": 5, "s1_asc": 7, "s1_des": 1})
    out = model(batch, generator=torch.Generator().manual_seed(0))
    assert out.masks["s2"].shape == (2, 5 * 9) and out.masks["s1"].shape == (2, (7 + 1) * 9)
    assert out.reconstructions["s2"].shape == (2, 5, 10, 6, 6)
    assert model.encode(batch)["s1_des"].shape == (2, 9, 32)


def test_resize_to_image_size(small_config, make_batch):
    cfg = small_config()
    model = build_model(cfg)
    batch = make_batch(cfg)
    batch["aerial"] = batch["aerial"][..., :30, :30]  # loader crop smaller than image_size
    out = model(batch, generator=torch.Generator().manual_seed(0))
    assert out.targets["aerial"].shape == (2, 1, 4, 60, 60)


def test_short_run_on_a_fixed_batch_lowers_the_loss(small_config, make_batch):
    cfg = small_config("model.size=tiny")  # memorizing noise in 24 steps needs tiny's capacity
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
def test_every_dataset_preset(dataset, make_batch):
    cfg = config.from_dict({"data": {"dataset": dataset}}, ["model.size=debug", "model.inter_depth=1"])
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


def test_output_is_also_a_mapping_with_lazy_images(small_config, make_batch):
    from types import SimpleNamespace

    cfg = small_config()
    out = build_model(cfg)(make_batch(cfg), generator=torch.Generator().manual_seed(0))
    ns = SimpleNamespace(**out)  # how a training loop may unpack it
    assert ns.loss is out.loss and out["masks"] is out.masks
    assert set(ns.reconstructions) == set(cfg.derived.modalities)
    assert ns.pixel_masks["s2"].shape == (2, 16, 10, 6, 6)
    assert ns.reconstructions["s2"] is out.reconstructions["s2"]  # built once
    with pytest.raises(KeyError):
        out["geometry"]


def test_bf16_weights_and_inputs(small_config, make_batch):
    cfg = small_config()
    model = build_model(cfg).to(torch.bfloat16)
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in make_batch(cfg).items()}
    out = model(batch, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert model.encode(batch)["aerial"].dtype == torch.bfloat16


def test_modalities_with_one_embedding_name_share_the_layers(small_config, make_batch):
    cfg = small_config("data.modalities.s1_asc.embed=s1", "data.modalities.s1_des.embed=s1")
    model = build_model(cfg)
    assert list(model.patch_embed) == list(model.embed_to_rec) == ["aerial", "s2", "s1"]
    assert set(model.mask_token) == {"aerial", "s2", "s1_asc", "s1_des"}  # mask tokens stay per modality
    out = model(make_batch(cfg), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert model.patch_embed["s1"].patchify_bands[0].conv.weight.grad is not None


def test_flash_attention_on_cpu_is_a_clear_error(small_config, make_batch):
    cfg = small_config("model.attention=flash")
    with pytest.raises(ConfigError, match="model.attention"):
        build_model(cfg).encode(make_batch(cfg))


def _pad_dates(sample: dict, m: str, t: int) -> dict:
    """`sample` (a batch of one) with modality m's series padded at its end to t dates, as the padded
    collate does: zero values and dates, `valid` False, `MOD_ndates` the real count."""
    out = dict(sample)
    n = sample[m].shape[1]
    out[m] = torch.cat([sample[m], sample[m].new_zeros(1, t - n, *sample[m].shape[2:])], 1)
    out[f"{m}_dates"] = torch.cat([sample[f"{m}_dates"], sample[f"{m}_dates"].new_zeros(1, t - n, 3)], 1)
    valid = torch.ones(1, t, *sample[m].shape[-2:], dtype=torch.bool)
    valid[:, n:] = False
    out[f"{m}_valid"], out[f"{m}_ndates"] = valid, torch.tensor([n])
    return out


def test_padding_never_reaches_attention_or_the_loss(small_config, make_batch):
    """A sample padded from 3 to 5 S2 dates inside a batch gives exactly what it gets alone."""
    cfg = small_config()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    alone = make_batch(cfg, batch=1, seed=0, dates={"s2": 3})
    other = make_batch(cfg, batch=1, seed=1, dates={"s2": 5})
    other["s2_valid"], other["s2_ndates"] = torch.ones(1, 5, 6, 6, dtype=torch.bool), torch.tensor([5])
    padded = _pad_dates(alone, "s2", 5)
    both = {k: torch.cat([padded[k], other[k]]) for k in padded}
    g, n = 1, cfg.derived.modalities["s2"].tokens_per_date
    with torch.no_grad():
        enc_alone, enc_other, enc = model.encode(alone), model.encode(other), model.encode(both)
        out_alone = model(alone, generator=torch.Generator().manual_seed(0))
        out_other = model(other, generator=torch.Generator().manual_seed(1))
        mask = {}
        for key, m in out_alone.masks.items():  # the alone mask at the real positions, padding hidden
            if key == "s2":
                m = torch.cat([m.view(1, g, 3, n), torch.ones(1, g, 2, n, dtype=torch.bool)], 2).flatten(1)
            mask[key] = torch.cat([m, out_other.masks[key]])
        out = model(both, mask=mask)
        out_one = model(padded, mask={k: v[:1] for k, v in mask.items()})
    for m in cfg.derived.modalities:
        if m == "s2":
            real = enc["s2"][0].view(g, 5, n, -1)
            torch.testing.assert_close(
                real[:, :3].reshape(1, -1, real.shape[-1]), enc_alone["s2"], atol=1e-6, rtol=0
            )
            assert not real[:, 3:].any()  # padding dates' tokens are zeros
        else:
            torch.testing.assert_close(enc[m][:1], enc_alone[m], atol=1e-6, rtol=0)
        torch.testing.assert_close(enc[m][1:], enc_other[m], atol=1e-6, rtol=0)
    torch.testing.assert_close(out_one.loss, out_alone.loss, atol=1e-6, rtol=1e-6)
    for m, v in out_alone.loss_per_modality.items():
        torch.testing.assert_close(out_one.loss_per_modality[m], v, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        out.reconstructions["s2"][:1, :3], out_alone.reconstructions["s2"], atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        out.reconstructions["s2"][1:], out_other.reconstructions["s2"], atol=1e-6, rtol=0
    )
    assert not out.reconstructions["s2"][0, 3:].any() and not out.valid["s2"][0, 3:].any()
    assert all(torch.equal(out.masks[k], mask[k]) for k in mask)
    # Random draws leave padding hidden and mask each sample at its own ratio.
    drawn = model(both, generator=torch.Generator().manual_seed(2)).masks["s2"]
    assert drawn[0].view(g, 5, n)[:, 3:].all()
    assert (~drawn).sum(1).tolist() == [3 * n - round(0.75 * 3 * n), 5 * n - round(0.75 * 5 * n)]


def test_padded_date_counts_are_checked(small_config, make_batch):
    cfg = small_config()
    batch = make_batch(cfg)
    batch["s2_ndates"] = torch.tensor([16, 17])
    with pytest.raises(ValueError, match="s2_ndates"):
        build_model(cfg).encode(batch)


def test_bf16_model_with_a_resized_modality_runs_forward_and_backward(make_batch):
    """The demo config's aerial is resized in the model; a bf16 model takes float32 inputs (the
    trainer no longer casts them) and casts the encoder's input itself."""
    cfg = config.load("configs/demo.yaml", ["model.size=debug", "model.inter_depth=1"])
    model = build_model(cfg).to(torch.bfloat16)
    batch = make_batch(cfg)
    batch["aerial"] = torch.rand(2, 1, 4, 90, 90, generator=torch.Generator().manual_seed(0))
    for inputs in (batch, {k: v.bfloat16() if v.is_floating_point() else v for k, v in batch.items()}):
        out = model(inputs, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        assert (
            out.targets["aerial"].shape == (2, 1, 4, 60, 60) and out.targets["aerial"].dtype == torch.float32
        )
        assert torch.isfinite(out.loss)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
