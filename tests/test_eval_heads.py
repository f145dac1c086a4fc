"""Downstream heads: the reference's weights load strictly (heads included) and give its probe logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from maestro import config
from maestro.errors import CheckpointError
from maestro.model import build_model, load_reference_state_dict
from maestro.model.heads import AttentiveReduce, SegmentationHead


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    d = fixtures_dir / "reference_model" / "treesatai_ts_tiny"
    model = build_model(config.from_dict({})).eval()
    ignored = load_reference_state_dict(model, load_file(d / "state_dict.safetensors"))
    batch = {k: torch.from_numpy(v) for k, v in np.load(d / "batch.npz").items()}
    return model, ignored, batch, np.load(d / "extras.npz")


def test_heads_load_strictly_and_give_the_reference_probe_logits(reference):
    model, ignored, batch, extras = reference
    assert ignored == []  # nothing set aside: the heads are loaded too
    with torch.no_grad():
        logits = model.predict(batch)
    want = torch.from_numpy(extras["probe/logits/treesat_mlc_thresh"])
    assert set(logits) == {"treesat_mlc_thresh"} and logits["treesat_mlc_thresh"].shape == (2, 15)
    torch.testing.assert_close(logits["treesat_mlc_thresh"], want, atol=1e-4, rtol=0)


def test_a_state_dict_without_the_configured_head_is_refused(fixtures_dir):
    d = fixtures_dir / "reference_model" / "treesatai_ts_tiny"
    model = build_model(config.from_dict({"data": {"targets": ["treesat_mlc"]}}))
    with pytest.raises(CheckpointError, match="heads.treesat_mlc.linear.weight"):
        load_reference_state_dict(model, load_file(d / "state_dict.safetensors"))


def test_linear_head_is_a_mean_then_a_linear_layer():
    model = build_model(config.from_dict({"model": {"size": "debug", "inter_depth": 1, "head": "linear"}}))
    head = model.heads["treesat_mlc_thresh"]
    tokens = {"a": torch.randn(3, 5, 32), "b": torch.randn(3, 2, 32)}
    want = head.linear(torch.cat([tokens["a"], tokens["b"]], 1).mean(1))
    torch.testing.assert_close(head(tokens), want)


def test_attentive_reduce_is_a_softmax_weighted_mean_per_head():
    torch.manual_seed(0)
    red = AttentiveReduce(16, heads=2)
    x = torch.randn(4, 7, 16)
    k, v = red.to_kv(red.norm(x)).chunk(2, -1)
    outs = []
    for h in range(2):
        sl = slice(8 * h, 8 * h + 8)
        w = torch.softmax(k[..., sl] @ red.query[sl] / 8**0.5, dim=-1)  # (4, 7)
        outs.append((w[..., None] * v[..., sl]).sum(1))
    torch.testing.assert_close(red(x), red.norm_fc(torch.cat(outs, -1)))


def test_segmentation_head_predicts_the_target_grid_from_every_modality():
    head = SegmentationHead("attentive", 16, classes=5, grid=4, scale=2, grids={"s2": 4, "spot": 2})
    tokens = {"s2": torch.randn(2, 3 * 16, 16), "spot": torch.randn(2, 4, 16, requires_grad=True)}
    out = head(tokens)
    assert out.shape == (2, 5, 8, 8)
    out.sum().backward()
    assert tokens["spot"].grad.abs().sum() > 0  # the coarse modality reaches every location


def test_segmentation_head_puts_each_sub_pixel_where_the_conv_says():
    head = SegmentationHead("linear", 4, classes=3, grid=1, scale=2, grids={"m": 1})
    with torch.no_grad():
        head.conv.weight.zero_()
        head.conv.bias.copy_(torch.arange(12.0))  # channel = (q1·2 + q2)·3 + k
    out = head({"m": torch.zeros(1, 1, 4)})
    assert out[0, 2, 1, 0] == (1 * 2 + 0) * 3 + 2


def test_pastis_model_has_a_segmentation_head_on_the_s2_grid():
    cfg = config.from_dict({"data": {"dataset": "pastis_hd"}, "model": {"size": "debug", "inter_depth": 1}})
    head = build_model(cfg).heads["pastis_seg"]
    assert isinstance(head, SegmentationHead) and (head.grid, head.scale) == (8, 2)
    assert head.conv.out_channels == 19 * 4
