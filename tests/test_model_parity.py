"""Parity with the reference implementation: its released-format weights and a real TreeSatAI-TS batch
(fixtures made by running IGNF/MAESTRO at 6a30075, tiny, fp32, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from maestro import config
from maestro.errors import CheckpointError
from maestro.model import build_model, load_reference_state_dict

GROUPS = {"aerial": ["aerial"], "s2": ["s2"], "s1": ["s1_asc", "s1_des"]}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    d = fixtures_dir / "reference_model" / "treesatai_ts_tiny"
    state = load_file(d / "state_dict.safetensors")
    model = build_model(config.from_dict({})).eval()
    ignored = load_reference_state_dict(model, state)
    batch = {k: torch.from_numpy(v) for k, v in np.load(d / "batch.npz").items()}
    return {"dir": d, "state": state, "model": model, "ignored": ignored, "batch": batch}


def test_every_reference_key_loads_heads_included(ref):
    assert ref["ignored"] == []  # the downstream heads load too (maestro/model/heads.py)


def test_encode_matches_the_reference_encoder(ref):
    expected = np.load(ref["dir"] / "encoder_outputs.npz")
    with torch.no_grad():
        enc = ref["model"].encode(ref["batch"])
    for group, mods in GROUPS.items():
        ours = torch.cat([enc[m] for m in mods], 1)
        assert rel_err(ours, torch.from_numpy(expected[group])) < 1e-4, group


def test_pretrain_forward_with_the_saved_mask_gives_the_intended_outputs(ref):
    d = ref["dir"]
    saved = np.load(d / "pretrain_mask.npz")
    mask = {g: torch.from_numpy(saved[g][..., 0]) for g in GROUPS}
    expected = dict(np.load(d / "pretrain_pixels_rec.npz"))
    expected.update(np.load(d / "pretrain_pixels_rec_intended.npz"))  # each position's own mask token
    meta = json.loads((d / "meta.json").read_text())
    with torch.no_grad():
        out = ref["model"](ref["batch"], mask=mask)
    for m, rec in expected.items():
        assert rel_err(out.reconstructions[m], torch.from_numpy(rec)) < 1e-4, m
    want = meta["pretrain"]["loss_l1_norm_intended_unmask"]
    assert abs(out.loss.item() - want) / want < 1e-4
    for m in ("aerial", "s2"):  # groups of one modality: the reference as run is the intended one
        got, ref_m = out.loss_per_modality[m].item(), meta["pretrain"]["loss_per_modality"][m]["loss"]
        assert abs(got - ref_m) / ref_m < 1e-4
    assert all(torch.equal(out.masks[g], mask[g]) for g in GROUPS)


def test_lightning_prefix_and_ema_entries(ref):
    model = ref["model"]  # reloading the same weights under other names leaves it unchanged
    state = {f"model.{k}": v for k, v in ref["state"].items()}
    state.update({f"ema_model.{k}": v for k, v in list(ref["state"].items())[:3]})
    ignored = load_reference_state_dict(model, state)
    assert sum(k.startswith("ema_model.") for k in ignored) == 3
    torch.testing.assert_close(
        model.state_dict()["decoder.s1.norm.weight"], ref["state"]["decoder.s1.norm.weight"]
    )


def test_checkpoints_before_the_s1_rename_load(ref):
    model = ref["model"]
    old = {k.replace(".s1.", ".sen1."): v for k, v in ref["state"].items()}
    load_reference_state_dict(model, old)
    torch.testing.assert_close(model.encoder["s1"].norm.weight, ref["state"]["encoder.s1.norm.weight"])


def test_mismatches_are_errors_that_list_the_keys(ref):
    model = ref["model"]  # nothing is loaded when the check fails
    state = dict(ref["state"])
    del state["encoder.s2.norm.bias"]
    state["encoder.s3.norm.bias"] = torch.zeros(192)
    state["mask_token.s2"] = torch.zeros(1, 2, 1, 1, 512)
    with pytest.raises(CheckpointError) as e:
        load_reference_state_dict(model, state)
    msg = str(e.value)
    assert "missing (1): encoder.s2.norm.bias" in msg and "unexpected (1): encoder.s3.norm.bias" in msg
    assert "mask_token.s2 (1, 2, 1, 1, 512)" in msg
    with torch.device("meta"):
        small = build_model(config.from_dict({}, ["model.size=small"]))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_reference_state_dict(small, ref["state"])
