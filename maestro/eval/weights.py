"""Where a downstream phase's weights come from, and how they are written.

`model.init`:
- `random`: the model as built (the baseline every probe is compared with);
- a `.safetensors` file (ours: `RUN/PHASE/best.safetensors`, `maestro export`) or a Lightning
  `.ckpt` / torch `.pt` (the reference's released checkpoints), read weights-only;
- a run folder (the default: the pretraining run of `run.name`): its newest complete checkpoint,
  the model weights DeepSpeed saved (ZeRO-3 partitions joined by DeepSpeed's fp32 consolidation).

Names map as `maestro.model.load_reference_state_dict` maps them (strict: the encoder must match
exactly). Heads are taken from the source when it has every head of the config's targets;
otherwise the heads start fresh (a pretraining checkpoint's heads were never trained), and
heads of other targets are set aside and reported.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Mapping

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from maestro import storage
from maestro.errors import CheckpointError
from maestro.model import load_reference_state_dict
from maestro.train import checkpoint

HEADS = "heads."


def _name(key: str) -> str:
    return key.removeprefix("model.")  # the engine wrapper (DictOutputs), the Lightning module


def read_file(url: str) -> dict[str, Tensor]:
    """The state dict of a .safetensors, .ckpt or .pt file (weights-only)."""
    data = storage.read_bytes(url)
    if url.endswith(".safetensors"):
        return load_safetensors(data)
    from maestro.parallel.deepspeed import safe_load

    obj = safe_load(io.BytesIO(data), map_location="cpu")
    if isinstance(obj, Mapping) and "state_dict" in obj:  # Lightning
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and "module" in obj:  # DeepSpeed model states
        obj = obj["module"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{url}: holds no state dict of tensors (expected weights saved by torch)")
    return dict(obj)


def is_file(source: str) -> bool:
    return source.endswith((".safetensors", ".ckpt", ".pt", ".pth"))


def check_init(source: str) -> None:
    """Raise CheckpointError (before any worker starts) when `model.init` names nothing loadable."""
    if source == "random":
        return
    if is_file(source):
        if not storage.exists(source):
            raise CheckpointError(f"model.init={source}: no such file")
        return
    _latest(source)


def _latest(url: str) -> tuple[checkpoint.CheckpointStore, int]:
    store = checkpoint.CheckpointStore(url, keep=1)
    step = store.latest()
    if step is None:
        raise CheckpointError(
            f"{url} holds no complete checkpoint to evaluate; pretrain first (maestro pretrain), or "
            "set model.init to a weights file or to 'random'"
        )
    return store, step


def read_run(url: str) -> dict[str, Tensor]:
    """The model weights of a run folder's newest complete checkpoint."""
    import json

    store, step = _latest(url)
    state = json.loads(store.read(step, "state.json"))
    name = checkpoint.tag(step)
    if state["zero_stage"] < 3:
        return read_file(storage.join(url, name, "mp_rank_00_model_states.pt"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from maestro.parallel.deepspeed import weights_only_loads

    with tempfile.TemporaryDirectory(prefix="maestro-init-") as tmp:
        fs, root = storage.url_to_fs(url)
        fs.get(f"{root}/{name}/", f"{tmp}/{name}/", recursive=True)
        with weights_only_loads():
            return dict(get_fp32_state_dict_from_zero_checkpoint(tmp, tag=name))


def read_init(source: str) -> dict[str, Tensor]:
    if is_file(source):
        return read_file(source)
    return read_run(source)


def load_init(model: nn.Module, source: str) -> list[str]:
    """Load `model.init` into `model` (see the module docstring); returns the keys set aside."""
    if source == "random":
        return []
    state = read_init(source)
    ours = model.state_dict()
    own_heads = {k for k in ours if k.startswith(HEADS)}
    theirs = {_name(k): v for k, v in state.items() if not k.startswith("ema_model.")}
    has_heads = own_heads <= set(theirs)
    aside = sorted(k for k in theirs if k.startswith(HEADS) and (k not in own_heads or not has_heads))
    merged = {k: v for k, v in theirs.items() if not k.startswith(HEADS)}
    merged.update({k: (theirs[k] if has_heads else ours[k]) for k in own_heads})
    try:
        load_reference_state_dict(model, merged)
    except CheckpointError as e:
        raise CheckpointError(f"model.init={source}: {e}") from e
    return aside


def save_weights(model: nn.Module, url: str) -> None:
    """The whole model's weights (encoder, decoder, heads) as safetensors at `url`."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes(url, save_safetensors(tensors))
