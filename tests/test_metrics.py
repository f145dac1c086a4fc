"""TensorBoard reconstruction panels: upscaled, one row per date, one value scale, captioned."""

from __future__ import annotations

import os

import torch

from maestro.train import metrics

S2_BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]


def _series(t: int = 4, c: int = 10, side: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(t, c, side, side, generator=g) * 0.4 + 0.05  # S2 reflectances / norm_fac


def _dates(t: int) -> torch.Tensor:
    return torch.tensor([[2020, 30 + 60 * i, 0] for i in range(t)], dtype=torch.int16)


def test_small_s2_panels_are_upscaled_one_row_per_date():
    t = _series()
    mask = torch.zeros_like(t)
    image = metrics.reconstruction_panel(t, t, mask, _dates(4), S2_BANDS)
    rows, side = 4, 6 * -(-metrics.MIN_SIDE // 6)
    assert image.shape == (3, rows * side + (rows - 1) * 2, 3 * side + 2 * 2)
    assert min(image.shape[1:]) >= metrics.MIN_SIDE


def test_input_and_reconstruction_share_one_scale():
    """Equal values give equal pixels in the input and reconstruction columns, also when the
    reconstruction is in the normalized patch space of `patch_group` targets."""
    t = _series()
    mask = torch.zeros_like(t)
    image = metrics.reconstruction_panel(t, t.clone(), mask, _dates(4), S2_BANDS)
    w = (image.shape[2] - 4) // 3
    assert torch.equal(image[:, :, :w], image[:, :, 2 * (w + 2) :])
    groups, patch = [4, 4, 2], 2  # S2's norm_bands, patch size
    x = t.reshape(4, 10, 3, 2, 3, 2)
    starts = [0, 4, 8]
    normalized = torch.empty_like(t)
    for s0, size in zip(starts, groups):
        part = x[:, s0 : s0 + size]
        mean = part.mean(dim=(1, 3, 5), keepdim=True)
        std = part.std(dim=(1, 3, 5), keepdim=True, unbiased=False)
        normalized[:, s0 : s0 + size] = ((part - mean) / (std + 1e-6)).reshape(4, size, 6, 6)
    image = metrics.reconstruction_panel(t, normalized, mask, _dates(4), S2_BANDS, groups, patch)
    assert torch.allclose(image[:, :, :w], image[:, :, 2 * (w + 2) :], atol=1e-4)


def test_true_colour_bands_and_masked_pixels():
    assert metrics.display_bands(S2_BANDS, 10) == [2, 1, 0]  # B04, B03, B02
    assert metrics.display_bands(["nir", "green", "blue", "red"], 4) == [3, 1, 2]
    assert metrics.display_bands(["VV", "VH"], 2) == [0, 0, 0]
    t = _series(1)
    mask = torch.zeros_like(t)
    mask[..., :3, :] = 1  # top half masked
    image = metrics.reconstruction_panel(t, t, mask, _dates(1), S2_BANDS)
    w = (image.shape[2] - 4) // 3
    masked_col = image[:, :, w + 2 : 2 * w + 2]
    assert masked_col[:, : image.shape[1] // 2].abs().sum() == 0
    assert masked_col[:, image.shape[1] // 2 :].abs().sum() > 0


def test_long_series_show_evenly_spaced_dates_and_skip_padding():
    dates = _dates(5)
    dates[4] = 0  # padding
    assert metrics.pick_dates(5, dates) == [0, 1, 2, 3]
    assert metrics.pick_dates(16, None) == [0, 3, 6, 9, 12, 15]


def test_caption_names_modality_sample_dates_and_mask_ratio():
    text = metrics.panel_caption("s2", "treesatai_0001", _dates(3), 3, 0.75)
    assert text.startswith("s2, sample treesatai_0001: rows = dates 2020-01-30, 2020-03-30, 2020-05-29")
    assert "input | masked input | reconstruction" in text and "75% of its pixels masked" in text


def test_board_without_a_folder_removes_its_temporary_one():
    board = metrics.Board()
    path = board.log_dir
    assert os.path.basename(path).startswith("maestro-tb-") and os.path.isdir(path)
    board.image(1, "images/s2", torch.rand(3, 8, 8), "s2, sample k")
    board.flush()
    assert os.listdir(path)
    board.close()
    assert not os.path.exists(path)


def test_panels_of_a_real_model_output(tmp_path):
    """`sample_panel` on a debug model's output for a TreeSatAI-TS-like batch: every modality gets
    an upscaled panel with one row per shown date and a caption naming the sample's dates."""
    from maestro import config
    from maestro.data import build_loader
    from maestro.model import build_model
    from shards.synth import write_synthetic

    write_synthetic(str(tmp_path), "treesatai_ts", samples=2, seed=0, max_dates=4, shard_samples=2)
    cfg = config.load(
        "configs/demo.yaml",
        [f"data.shards={tmp_path}/train", "model.size=debug", "model.inter_depth=1", "data.workers=0",
         "data.batch_size=2", "run.workers=1", "run.use_gpu=false"],
    )  # fmt: skip
    batch = next(iter(build_loader(cfg, 0, 1, train=True)))
    torch.manual_seed(0)
    out = build_model(cfg)({k: v for k, v in batch.items() if not k.startswith("_")})
    for m, spec in cfg.derived.modalities.items():
        image, caption = metrics.sample_panel(m, spec, cfg.loss.target_norm, out, batch)
        rows = len(metrics.pick_dates(out.targets[m].shape[1], batch[f"{m}_dates"][0]))
        assert image.shape[0] == 3 and min(image.shape[1:]) >= metrics.MIN_SIDE, (m, image.shape)
        assert float(image.min()) >= 0 and float(image.max()) <= 1
        assert caption.startswith(f"{m}, sample {batch['_keys'][0]}: rows = dates ")
        assert caption.count(", ") >= rows, caption
        print(f"images/{m}", tuple(image.shape))
