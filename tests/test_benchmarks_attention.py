"""benchmarks/attention.py on CPU: the shapes it times are the model's own (every attention call of
one forward recorded, heads and widths those of the size preset), and the no-GPU exit."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import attention
from maestro import config
from maestro.model import blocks, build_model
from maestro.sizes import SIZES
from shards.synth import write_synthetic


@pytest.fixture(scope="module")
def flair_hub_split(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("flair_hub")
    write_synthetic(str(root), "flair_hub", 2, 0, split="train", progress=False)
    return str(root / "train")


def test_records_every_attention_call_of_one_forward(flair_hub_split):
    cfg = config.load(
        "configs/flair_hub.yaml",
        [
            f"data.shards={flair_hub_split}",
            "model.size=debug",
            "model.inter_depth=1",
            "data.batch_size=2",
            "data.workers=0",
        ],
    )
    calls = attention.record_shapes(cfg, torch.device("cpu"), torch.float32)
    layers = sum(isinstance(m, blocks.Attention) for m in build_model(cfg).modules())
    assert sum(calls.values()) == layers > 0  # each attention layer runs once per forward
    size = SIZES["debug"]
    widths = {(size.heads, size.dim_head), (size.decoder_heads, size.decoder_dim_head)}
    dense = [k for k in calls if k[0] != "packed"]
    assert dense and all((h, d) in widths for _, h, _, d in dense)
    assert blocks.attention is not None and blocks.attention.__name__ == "attention"  # the spy is gone


def test_without_gpu_says_so_and_exits_zero(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention.main(["configs/flair_hub.yaml", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "no CUDA GPU" in out[0] and json.loads(out[-1]) == {"gpu": False}
