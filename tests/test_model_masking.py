"""Masking: exact ratio per sequence, structure first then random, never a whole group, reproducible
from a generator; given masks with unequal visible counts go through packed attention."""

from __future__ import annotations

import torch

from maestro.model import build_model
from maestro.model.attention import Packing
from maestro.model.masking import Structure, exact_mask, masked_count, propose, select_packed


def test_exact_count_and_structure_first():
    g = torch.Generator().manual_seed(0)
    prop = torch.zeros(400, 20, dtype=torch.bool)
    prop[:200, :5] = True  # fewer proposed than k: all of them are masked
    prop[200:, :15] = True  # more proposed than k: only proposed tokens are masked
    mask = exact_mask(400, 20, 10, prop, g, "cpu")
    assert (mask.sum(1) == 10).all()
    assert mask[:200, :5].all()
    assert not mask[200:, 15:].any()
    # Among the proposed tokens the choice is random, not the lowest indices (the reference's tie order).
    chosen = mask[200:, :15].float().mean(0)
    assert chosen.min() > 0.5 and chosen.max() < 0.85


def test_structural_proposal_units():
    g = torch.Generator().manual_seed(1)
    dates = propose([(1, 6, 9, Structure(dates=0.5))], 300, g, "cpu").view(300, 6, 9)
    assert ((dates.all(-1)) | (~dates.any(-1))).all()  # whole dates
    assert dates.any() and not dates.all(-1).all(-1).any()  # never the whole sequence
    loc = propose([(1, 6, 9, Structure(locations=0.5))], 300, g, "cpu").view(300, 6, 9)
    assert ((loc.all(1)) | (~loc.any(1))).all()  # whole locations across dates (tubes)
    two = propose([(1, 2, 4, Structure(modality=0.6)), (1, 3, 4, Structure(modality=0.6))], 300, g, "cpu")
    a, b = two[:, :8], two[:, 8:]
    assert ((a.all(1)) | (~a.any(1))).all() and ((b.all(1)) | (~b.any(1))).all()  # whole modalities
    assert not (a.all(1) & b.all(1)).any()  # never both: that would be the whole group
    bands = propose([(2, 1, 4, Structure(bands=0.5))], 300, g, "cpu").view(300, 2, 4)
    assert ((bands.all(-1)) | (~bands.any(-1))).all()


def test_model_masks_follow_ratio_and_structure(small_config):
    cfg = small_config("mask.modality=0.5", "mask.locations=null", "mask.dates=null")
    model = build_model(cfg)
    lay = model.layout({"aerial": [1] * 64, "s2": [16] * 64, "s1_asc": [4] * 64, "s1_des": [4] * 64}, "cpu")
    flat, visible = model.masking.draw(lay, torch.Generator().manual_seed(0), "cpu")
    masks = {k: v.view(64, -1) for k, v in flat.items()}
    expected = {"aerial": 9 - 7, "s2": 144 - 108, "s1": 72 - 54}
    assert {k: v.uniform for k, v in visible.items()} == expected
    for key, m in masks.items():
        assert ((~m).sum(1) == expected[key]).all()
    # k = 54 of 72 in s1: a whole proposed modality (36 tokens) is always fully masked.
    s1 = masks["s1"]
    assert (s1[:, :36].all(1) | s1[:, 36:].all(1)).float().mean() > 0.5


def test_masks_are_reproducible_and_drawn_on_the_generator_device(small_config):
    model = build_model(small_config())
    lay = model.layout({"aerial": [1] * 8, "s2": [16] * 8, "s1_asc": [4] * 8, "s1_des": [4] * 8}, "cpu")
    a, _ = model.masking.draw(lay, torch.Generator().manual_seed(5), "cpu")
    b, _ = model.masking.draw(lay, torch.Generator().manual_seed(5), "cpu")
    c, _ = model.masking.draw(lay, torch.Generator().manual_seed(6), "cpu")
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_select_packed_without_and_with_host_sync_agree():
    mask = exact_mask(5, 12, 8, None, torch.Generator().manual_seed(0), "cpu").flatten()
    known = select_packed(mask, Packing.dense(5, 4, "cpu"))  # total known: no host sync
    found = select_packed(mask, Packing.from_lengths(torch.full((5,), 4)))
    assert known.packing.total == 20 and found.packing.total is None
    assert torch.equal(known.rows, found.rows) and torch.equal(known.source, found.source)
    assert torch.equal(known.rows, torch.nonzero(~mask).squeeze(1))
    assert (known.source >= 0).sum() == 20 and (known.source[mask] == -1).all()


def test_mask_count_keeps_one_token_and_rounds_as_the_reference():
    assert masked_count(0.5, 5) == 2  # Python round(2.5) == 2
    assert masked_count(0.75, 225) == 169
    assert masked_count(0.95, 9) == 8  # round(8.55) = 9 would hide the whole sequence
    assert masked_count(0.75, 0) == 0
    assert masked_count(0.75, 144, 16, 0.5) == round((1 - 0.25 / 4) * 144)


def test_given_masks_with_unequal_counts_equal_separate_samples(make_batch, small_config):
    cfg = small_config()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = make_batch(cfg, batch=2)
    g = torch.Generator().manual_seed(0)
    mask = {k: v.clone() for k, v in model(batch, generator=g).masks.items()}
    mask["s2"][0, :20] = False  # sample 0 sees 20 more S2 tokens than sample 1
    mask["s1"][1, 40:] = True
    mask["s1"][1, 0] = False
    with torch.no_grad():
        both = model(batch, mask=mask)
        for i in range(2):
            one = model(
                {k: v[i : i + 1] for k, v in batch.items()}, mask={k: v[i : i + 1] for k, v in mask.items()}
            )
            for m, rec in one.reconstructions.items():
                torch.testing.assert_close(both.reconstructions[m][i : i + 1], rec, atol=1e-5, rtol=1e-4)


def test_attention_backends_agree_in_the_model(make_batch, small_config):
    cfg = small_config()
    batch = make_batch(cfg)
    losses = []
    for backend in ("sdpa", "math"):
        torch.manual_seed(0)
        model = build_model(small_config(f"model.attention={backend}"))
        losses.append(model(batch, generator=torch.Generator().manual_seed(0)).loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)


def test_triton_kernels_match_the_torch_references_in_the_model(make_batch, small_config):
    batch = make_batch(small_config())
    results = []
    for kernels in ("torch", "triton"):  # Triton under the interpreter on CPU (conftest)
        torch.manual_seed(0)
        model = build_model(small_config(f"model.kernels={kernels}"))
        out = model(batch, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, atol=1e-6, rtol=1e-4, msg=name)
