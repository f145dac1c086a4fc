"""`maestro export`: the encoder alone as safetensors, and `build_encoder(path)` to use it elsewhere.

The file holds the encoder's weights (patch embeddings, per-group encoders, joint blocks; no
decoder, mask tokens, pixel heads or downstream heads) under the reference's names, and in its
safetensors metadata the config that builds it (`maestro_config`: the run's YAML, resolved).
`build_encoder(path)` rebuilds the model from that config, loads the weights strictly and returns
an `Encoder`, an `nn.Module` whose `forward(batch)` gives the tokens of every modality,
`{MOD: (B, G·T·L, E)}` (TerraTorch/torchgeo-style backbone use), and `pooled(batch)` `(B, E)`.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from maestro import config, storage
from maestro.config import Config
from maestro.errors import CheckpointError
from maestro.eval.phase import PRETRAIN_ONLY
from maestro.eval.weights import load_init
from maestro.train.loop import run_url

DROPPED = (*PRETRAIN_ONLY, "heads")


def encoder_state(model: nn.Module) -> dict[str, Tensor]:
    return {
        k: v.detach().float().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k.split(".", 1)[0] not in DROPPED
    }


def export_encoder(cfg: Config, out: str) -> dict[str, Any]:
    """Write the encoder of `model.init` (by default the run's newest checkpoint) to `out`."""
    from maestro.model import build_model

    init = cfg.model.init or run_url(cfg)
    model = build_model(cfg)
    load_init(model, init)
    tensors = encoder_state(model)
    raw = {k: v for k, v in cfg.to_dict().items() if k != "derived"}
    raw["model"]["init"] = ""
    meta = {
        "format": "maestro-encoder",
        "version": "1",
        "maestro_config": yaml.safe_dump(raw, sort_keys=False),
    }
    storage.write_bytes(out, save_safetensors(tensors, metadata=meta))
    return {"out": out, "init": init, "parameters": sum(t.numel() for t in tensors.values())}


class Encoder(nn.Module):
    """A MAESTRO encoder as a backbone: tokens per modality, or their mean."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Model inputs as the loader gives them -> {MOD: (B, G·T·L, E)}."""
        return self.model.encode(batch)

    def pooled(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, E): the mean of every token of every modality."""
        return torch.cat(list(self(batch).values()), 1).mean(1)


def file_metadata(data: bytes, where: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (8-byte length, then JSON)."""
    try:
        n = int.from_bytes(data[:8], "little")
        return json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: not a safetensors file ({e})") from e


def build_encoder(path: str) -> Encoder:
    """The encoder written by `maestro export` at `path` (local or s3://), weights loaded strictly."""
    from maestro.model import build_model

    data = storage.read_bytes(path)
    meta = file_metadata(data, path)
    if meta.get("format") != "maestro-encoder":
        raise CheckpointError(f"{path}: not a maestro encoder file (write one with `maestro export`)")
    cfg = config.from_dict(yaml.safe_load(meta["maestro_config"]))
    weights = load_safetensors(data)
    model = build_model(cfg)
    for part in DROPPED:  # the encoder alone: what the file holds
        delattr(model, part)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the encoder weights do not match the config they carry: {e}") from e
    return Encoder(model.eval())
