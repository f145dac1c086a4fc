"""The model on packed batches (samples with their own date counts, concatenated without padding):
the same per-sample results as running each sample alone, exact per-sample mask counts, and a short
run on packed batches from the real loader that lowers the loss."""

from __future__ import annotations

import itertools

import pytest
import torch

from maestro import config, storage
from maestro.data import build_loader
from maestro.model import build_model
from maestro.model.masking import masked_count
from shards.synth import write_synthetic

# Dates per sample: s2 from 1 to 5, the others differing too (aerial is mono-date).
DATES = [
    {"s2": 3, "s1_asc": 2, "s1_des": 1, "aerial": 1},
    {"s2": 1, "s1_asc": 4, "s1_des": 2, "aerial": 1},
    {"s2": 5, "s1_asc": 1, "s1_des": 3, "aerial": 1},
]


def samples(cfg, make_batch) -> list[dict]:
    """Batches of one sample each, with their own dates, reference dates and invalid pixels."""
    out = []
    for i, dates in enumerate(DATES):
        b = make_batch(cfg, batch=1, seed=i, dates=dates)
        b["ref_date"] = torch.tensor([[[2020, 100 + 50 * i, 0]]])
        g = torch.Generator().manual_seed(10 + i)
        b["s2_valid"] = torch.rand(b["s2"].shape[:2] + b["s2"].shape[-2:], generator=g) > 0.1
        out.append(b)
    return out


def pack(batches: list[dict], cfg) -> dict:
    """Samples concatenated along the date axis, as `collate_packed` lays them out."""
    out = {"ref_date": torch.cat([b["ref_date"] for b in batches])}
    for m in cfg.derived.modalities:
        for name in (m, f"{m}_dates", f"{m}_valid"):
            if all(name in b for b in batches):
                out[name] = torch.cat([b[name] for b in batches], 1)
        counts = torch.tensor([0] + [b[m].shape[1] for b in batches])
        out[f"{m}_cu_dates"] = counts.cumsum(0).to(torch.int32)
    return out


def masked_elements(out, m: str) -> torch.Tensor:
    """Elements counted in modality m's loss: valid pixels of masked tokens, per channel."""
    return (out.pixel_masks[m] & out.valid[m][:, :, None]).sum()


@pytest.mark.parametrize("fusion,inter", [("group", 1), ("monotemp", 0)])
def test_packed_batch_matches_samples_run_alone_with_given_masks(fusion, inter, small_config, make_batch):
    cfg = small_config(f"model.fusion={fusion}", f"model.inter_depth={inter}")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    mods = cfg.derived.modalities
    alone = samples(cfg, make_batch)
    packed = pack(alone, cfg)
    with torch.no_grad():
        singles = [model(b, generator=torch.Generator().manual_seed(i)) for i, b in enumerate(alone)]
        mask = {k: torch.cat([o.masks[k].flatten() for o in singles]) for k in singles[0].masks}
        out = model(packed, mask=mask)
        enc = model.encode(packed)
        enc_alone = [model.encode(b) for b in alone]

    assert {k: torch.equal(v, mask[k]) for k, v in out.masks.items()} == dict.fromkeys(mask, True)
    for k, cu in out.cu_seqlens.items():
        assert int(cu[-1]) == mask[k].numel()
    for m, s in mods.items():
        cu = packed[f"{m}_cu_dates"].tolist()
        assert out.reconstructions[m].shape == packed[m].shape
        tok = 0
        for i, single in enumerate(singles):
            a, b = cu[i], cu[i + 1]
            torch.testing.assert_close(
                out.reconstructions[m][:, a:b], single.reconstructions[m], atol=1e-5, rtol=0
            )
            assert torch.equal(out.targets[m][:, a:b], single.targets[m])
            n = (b - a) * len(s.groups) * s.tokens_per_date
            torch.testing.assert_close(enc[m][:, tok : tok + n], enc_alone[i][m], atol=1e-5, rtol=0)
            tok += n
        assert enc[m].shape[1] == tok

    # Per modality: sums and counts of the samples combined, then weighted by the registry's num_dates.
    num, den = 0.0, 0.0
    for m, s in mods.items():
        counts = torch.stack([masked_elements(o, m) for o in singles]).double()
        sums = torch.stack([o.loss_per_modality[m].double() for o in singles]) * counts
        assert int(masked_elements(out, m)) == int(counts.sum())
        expected = sums.sum() / counts.sum().clamp_min(1)
        torch.testing.assert_close(out.loss_per_modality[m].double(), expected, atol=1e-5, rtol=1e-5)
        if counts.sum() > 0:
            w = s.num_dates * s.tokens_per_date
            num, den = num + w * expected, den + w
    torch.testing.assert_close(out.loss.double(), num / den, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion,inter", [("group", 1), ("mod", 0), ("shared", 0)])
def test_random_packed_masks_have_exact_counts_per_sample_and_are_deterministic(
    fusion, inter, small_config, make_batch
):
    cfg = small_config(f"model.fusion={fusion}", f"model.inter_depth={inter}")
    model = build_model(cfg)
    packed = pack(samples(cfg, make_batch), cfg)
    mods = cfg.derived.modalities

    def run(seed: int):
        with torch.no_grad():
            return model(packed, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert any(not torch.equal(a.masks[k], c.masks[k]) for k in a.masks)
    assert torch.equal(a.loss, b.loss) and torch.isfinite(a.loss)
    for key, members in model.members.items():
        lengths = [sum(d[m] * len(mods[m].groups) * mods[m].tokens_per_date for m in members) for d in DATES]
        cu = a.cu_seqlens[key].tolist()
        masked = [int(a.masks[key][x:y].sum()) for x, y in itertools.pairwise(cu)]
        if fusion == "shared":  # one sequence per image, each at the plain ratio
            n = mods[key].tokens_per_date
            assert cu == list(range(0, sum(lengths) + 1, n))
            assert masked == [masked_count(cfg.mask.ratio, n)] * (len(cu) - 1)
            continue
        assert cu == torch.tensor([0, *lengths]).cumsum(0).tolist()
        expected = []
        for d, length in zip(DATES, lengths):
            images = sum(d[m] * len(mods[m].groups) for m in members)
            expected.append(masked_count(cfg.mask.ratio, length, images, cfg.mask.scale))
        assert masked == expected
        assert all(k < length for k, length in zip(masked, lengths))  # never a fully masked sequence


def test_given_packed_mask_that_hides_a_whole_sample_is_refused(small_config, make_batch):
    cfg = small_config()
    model = build_model(cfg)
    packed = pack(samples(cfg, make_batch), cfg)
    with torch.no_grad():
        mask = dict(model(packed, generator=torch.Generator().manual_seed(0)).masks)
        cu = model(packed, mask=mask).cu_seqlens["s2"]
    mask["s2"] = mask["s2"].clone()
    mask["s2"][int(cu[1]) : int(cu[2])] = True
    with pytest.raises(ValueError, match="whole sequence"):
        model(packed, mask=mask)
    with pytest.raises(ValueError, match="packed batch takes"):
        model(packed, mask={**mask, "s2": mask["s2"][1:]})


def test_debug_model_learns_on_packed_batches_from_the_loader(tmp_path):
    write_synthetic(
        str(tmp_path), "treesatai_ts", 8, seed=1, sizes={"aerial": 34}, max_dates=None, shard_samples=4
    )
    # Uncapped synthetic series run to ~150 dates: one token per date keeps the run short.
    modalities = {
        "aerial": {"resolution_m": 2.0, "image_size": 30, "patch_size": 10},
        **{m: {"dates": "all", "patch_size": 6} for m in ("s2", "s1_asc", "s1_des")},
    }
    data = {
        "shards": storage.join(str(tmp_path), "train"),
        "workers": 0,
        "shuffle_buffer": 0,
        "modalities": modalities,
        "token_budget": 2000,
    }
    cfg = config.from_dict({"data": data, "model": {"size": "debug", "inter_depth": 1}})
    batch = next(iter(build_loader(cfg)))
    batch = {k: v for k, v in batch.items() if not k.startswith("_")}
    n = len(batch["ref_date"])
    assert n > 1 and len(set(batch["s2_cu_dates"].diff().tolist())) > 1  # samples of their own lengths

    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        out = model(batch, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        assert torch.isfinite(out.loss)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(out.cu_seqlens[k].numel() == n + 1 for k in out.masks)
