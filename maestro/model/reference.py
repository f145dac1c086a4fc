"""Loading the reference implementation's weights (IGNF/MAESTRO state dicts, §1.11).

Our module names follow the reference's, so loading is a strict name mapping: the Lightning
`model.` prefix is stripped when present, the EMA mirror (`ema_model.`) is set aside and reported,
the downstream heads (`heads.TARGET.*`) load strictly like the rest, checkpoints from before the `sen1` → `s1`
rename are mapped, and anything else missing, unexpected or of the wrong shape is an error that
lists the keys — never a silent partial load.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from maestro.errors import CheckpointError

IGNORED_PREFIXES = ("ema_model.",)
RENAMES = {".sen1.": ".s1."}  # reference commit 66018a1 (2025-12-22) renamed the S1 group


def _show(keys: list[str], limit: int = 12) -> str:
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_reference_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Copy a reference MAESTRO state dict into `model`; returns the keys ignored (the EMA mirror).

    Raises CheckpointError naming the missing, unexpected and mis-shaped keys."""
    ours = model.state_dict()
    mapped: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in state_dict.items():
        name = key.removeprefix("model.") if not key.startswith("ema_model.") else key
        if name.startswith(IGNORED_PREFIXES):
            ignored.append(key)
            continue
        for old, new in RENAMES.items():
            if old in name and name not in ours:
                name = name.replace(old, new)
        mapped[name] = value
    missing = sorted(set(ours) - set(mapped))
    unexpected = sorted(set(mapped) - set(ours))
    wrong = sorted(
        f"{k} {tuple(v.shape)} vs ours {tuple(ours[k].shape)}"
        for k, v in mapped.items()
        if k in ours and v.shape != ours[k].shape
    )
    if missing or unexpected or wrong:
        parts = [
            f"{label} ({len(keys)}): {_show(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise CheckpointError(
            "reference state dict does not match the model built from this config; "
            + "; ".join(parts)
            + ". Check data.dataset, data.inputs, data.targets, model.size, model.fusion, model.inter_depth "
            "and model.head."
        )
    with torch.no_grad():
        model.load_state_dict(mapped, strict=True)
    return ignored
