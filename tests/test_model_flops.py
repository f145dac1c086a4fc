"""Parameter counts against the reference model's for every size and preset, and the FLOPs formula."""

from __future__ import annotations

import json

import pytest

from maestro import config, info
from maestro.model.flops import block_flops, flops_per_sample, parameter_counts
from maestro.sizes import REFERENCE_NAMES

DATASETS = {"treesatai_ts": "treesatai_ts", "pastis_hd": "pastis_hd", "flair_hub": "flair"}


@pytest.fixture(scope="module")
def reference_counts(fixtures_dir):
    path = fixtures_dir.parent / "reference" / "reference_params.json"
    return json.loads(path.read_text())["counts"]


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_parameters_equal_the_reference(reference_counts, dataset, size):
    ref = reference_counts[DATASETS[dataset]][REFERENCE_NAMES[size]]
    ours = parameter_counts(config.from_dict({"data": {"dataset": dataset}, "model": {"size": size}}))
    parts = {k: v for k, v in ref["per_submodule"].items() if k != "heads"}  # probe heads: not built here
    assert {k: ours[k] for k in parts} == parts
    assert ours["total"] == ref["total"] - ref["per_submodule"]["heads"]


def test_info_report_has_parameters_and_flops():
    rep = info.report(config.from_dict({}))
    assert rep["parameters"]["total"] == 15960455 - 77583
    assert rep["flops_per_sample"]["total"] == pytest.approx(
        rep["flops_per_sample"]["encoder"] + rep["flops_per_sample"]["decoder"]
    )


def test_flops_by_hand_for_one_modality():
    # One S2 modality, one date, mod fusion without joint blocks: every term can be written out.
    cfg = config.from_dict(
        {
            "data": {"inputs": ["s2"], "dataset": "pastis_hd", "modalities": {"s2": {"num_dates": 1}}},
            "model": {"fusion": "mod", "inter_depth": 0},
        }
    )
    n, vis, c, p = 64, 64 - 48, 10, 2
    e, ed = 192, 512
    enc = 2 * n * c * p * p * e + 12 * (
        2 * vis * e * 3 * 192 + 4 * vis * vis * 192 + 2 * vis * 192 * e + 4 * vis * e * 384
    )
    dec = 2 * vis * e * ed + (2 * n * ed * 3 * 512 + 4 * n * n * 512 + 2 * n * 512 * ed + 4 * n * ed * 768)
    dec += 2 * n * ed * c * p * p
    got = flops_per_sample(cfg)
    assert got == {"encoder": enc, "decoder": dec, "total": enc + dec}
    assert block_flops(vis, e, 3, 64, 384) == (enc - 2 * n * c * p * p * e) / 12


def test_flops_grow_with_the_mask_ratio_only_in_the_encoder():
    def at(ratio: float, *overrides: str) -> dict[str, float]:
        return flops_per_sample(config.from_dict({}, [f"mask.ratio={ratio}", *overrides]))

    # debug: E = E_d, no enc_to_dec projection, so the decoder (all tokens) does not see the ratio.
    lo, hi = (
        at(0.5, "model.size=debug", "model.inter_depth=1"),
        at(0.75, "model.size=debug", "model.inter_depth=1"),
    )
    assert lo["encoder"] > hi["encoder"] and lo["decoder"] == hi["decoder"]
    # tiny: E != E_d; the decoder changes by exactly the enc_to_dec rows, 2·Δvisible·E·E_d.
    lo, hi = at(0.5), at(0.75)
    visible = {r: info.tokens(config.from_dict({}, [f"mask.ratio={r}"]))["visible"] for r in (0.5, 0.75)}
    assert lo["encoder"] > hi["encoder"]
    assert lo["decoder"] - hi["decoder"] == 2.0 * (visible[0.5] - visible[0.75]) * 192 * 512
    shared = at(0.75, "model.fusion=shared", "model.inter_depth=0")
    assert shared["encoder"] < hi["encoder"]  # per-image sequences: shorter attention
